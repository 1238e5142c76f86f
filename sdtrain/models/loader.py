"""The loader: `load_parts` builds the parts from a diffusers folder or a single-file checkpoint,
picks the model's family (`sdtrain.models.family`) and sets up the noise schedule.

It is `model.parts`'s `_target_` (through `sdtrain.models.lora.load_parts`, which adds adapters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtrain.models.families import detect
from sdtrain.models.parts import Parts, check_folder, load_frozen, load_unet
from sdtrain.models.single_file import check_single_file, is_single_file


def check_model_folder(path: str | Path, need_unet: bool = True) -> Path:
    """Fail early, naming the folder and what is missing, if `path` is neither a diffusers folder
    of a family sdtrain trains nor an original-layout single file."""
    path = Path(path).expanduser()
    if is_single_file(path):  # an original-layout .safetensors (sdtrain.models.single_file)
        return check_single_file(path)
    return check_folder(path, need_unet, detect(path))


def rescale_zero_terminal_snr(scheduler):
    """A copy of the noise scheduler whose betas are rescaled to zero SNR at t = T - 1 (Lin et al.
    2023, Algorithm 1, diffusers' `rescale_betas_zero_snr`), with "trailing" timestep spacing
    (their section 3.3) so the samplers built from its config start from pure noise, t = T - 1.

    SD's schedule leaves SNR ~0.005 at the last step: training always sees a trace of the image's
    mean brightness that sampling from pure noise lacks, so images come out mid-grey. The rescale
    needs v-prediction: at SNR 0 the input is pure noise, an epsilon target is the input itself
    (nothing to learn) and x0 = (x_T - sqrt(1 - a) eps) / sqrt(a) divides by sqrt(a) = 0.
    """
    kind = scheduler.config.prediction_type
    if kind != "v_prediction":
        raise ValueError(
            f"model.zero_terminal_snr=true needs model.prediction_type=v_prediction, not {kind!r}: "
            "at zero SNR an epsilon model cannot predict x0 (Lin et al. 2023, section 3.2)"
        )
    return type(scheduler).from_config(
        scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )


def load_parts(
    pretrained: str | Path,
    unet_config: str | dict[str, Any] | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
    single_file_config: str | Path | None = None,
) -> Parts:
    """All parts from a diffusers folder, or from a single-file SD checkpoint.

    Args:
        pretrained: folder with vae/, text_encoder/, tokenizer/, scheduler/ (and unet/), or an
            original-layout .safetensors (SD-1.x / SD-2.x, as AUTOMATIC1111 and ComfyUI load).
        unet_config: None to load the folder's U-Net; a dict of UNet2DConditionModel arguments or
            a config.json path for a fresh U-Net of that shape (pretraining).
        prediction_type: "epsilon" or "v_prediction" to override the folder's scheduler; None
            keeps the folder's.
        zero_terminal_snr: rescale the noise schedule to zero SNR at its last step (needs
            v_prediction; `rescale_zero_terminal_snr`).
        single_file_config: for a single file, the diffusers-format folder of its configs and
            tokenizer (`sdtrain.models.single_file.load_single_file`); unused for a folder.
    """
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(
            f"model.prediction_type={prediction_type!r}; use 'epsilon' or 'v_prediction'"
        )
    family = detect(pretrained)  # first: a model of another family is named, not half-loaded
    unet, vae, text_encoder, tokenizer, scheduler = load_models(
        pretrained, unet_config, single_file_config, family
    )
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    if zero_terminal_snr:
        scheduler = rescale_zero_terminal_snr(scheduler)
    configs = single_file_config if is_single_file(pretrained) else None
    return Parts(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        str(Path(pretrained).expanduser()),
        str(Path(configs).expanduser()) if configs else None,
        family,
    )


def load_models(
    pretrained: str | Path, unet_config, single_file_config: str | Path | None, family=None
):
    """(unet, vae, text_encoder, tokenizer, noise scheduler) from a folder or a single file (of
    `family`, its layout; None: found from the model)."""
    family = family or detect(pretrained)
    if is_single_file(pretrained):
        fresh = None if unet_config is None else load_unet(pretrained, unet_config)
        reader = family.single_file_module().load_single_file
        p = reader(check_single_file(pretrained), single_file_config, unet=fresh)
        return p.unet, p.vae, p.text_encoder, p.tokenizer, p.noise_scheduler
    vae, text_encoder, tokenizer, scheduler = load_frozen(pretrained)
    return load_unet(pretrained, unet_config), vae, text_encoder, tokenizer, scheduler
