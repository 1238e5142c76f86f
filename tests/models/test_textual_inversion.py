"""Textual inversion on the tiny SD and SDXL (`sdtrain.models.textual_inversion`): new tokens in
the tokenizer(s), their rows alone train (every other weight bit for bit as loaded), the
optimizer, EMA and checkpoint hold only them; the exported embedding file, read by diffusers'
`load_textual_inversion` into a fresh pipeline from the tiny folder, encodes a prompt with the
token as the trained encoder does; the exported folder too; bad settings are named; and through
`sdtrain-train experiment=textual_inversion` the data's captions carry the token and a resumed
run ends where an uninterrupted one does. The runs are real: AdamW steps under a Lightning
Trainer on random pixels and captions naming the token."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtrain.artifacts import checkpoint
from sdtrain.artifacts.export import export, export_single_file
from sdtrain.artifacts.export_embedding import export_embedding
from sdtrain.models import lora
from sdtrain.models import textual_inversion as ti
from sdtrain.models.loader import load_parts
from sdtrain.models.tokens import tokenize
from sdtrain.training.ema import EMA
from sdtrain.training.module import StableDiffusionModule
from tests.conftest import compose_cfg, cpu_trainer, tiny_overrides

TOKEN = "<my-thing>"
PROMPT = f"a photo of {TOKEN}, a red circle"
INIT = "red"  # one token in the tiny vocabulary
VECTORS = 2  # a multi-vector token: <my-thing> <my-thing>_1, as diffusers names them
SETTINGS = {"tokens": [TOKEN], "init_word": INIT, "vectors": VECTORS}


def batches(tokenizer, n: int, sdxl: bool) -> list[dict]:
    """`n` random batches of 2 whose captions name the token (SDXL: with sizes and crops)."""
    g = torch.Generator().manual_seed(0)
    ids = tokenize(tokenizer, [PROMPT, f"a blue {TOKEN}"])
    extra = {"original_size": torch.tensor([[32, 32]] * 2), "crop_top_left": torch.zeros(2, 2)}
    return [
        {"pixels": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "input_ids": ids}
        | (extra if sdxl else {})
        for _ in range(n)
    ]


def fit(m: StableDiffusionModule, steps: int, root: Path, sdxl: bool) -> Path:
    """`steps` optimizer steps with Lightning on the CPU; the checkpoint it then saves."""
    trainer = cpu_trainer(max_steps=steps, default_root_dir=root)
    data = torch.utils.data.DataLoader(batches(m.tokenizer, steps, sdxl), batch_size=None)
    trainer.fit(m, data)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def run(request, tiny_model: Path, tiny_sdxl: Path, tmp_path_factory):
    """3 AdamW steps of textual inversion (EMA on); the module, its checkpoint, the folder."""
    sdxl = request.param == "sdxl"
    folder = tiny_sdxl if sdxl else tiny_model
    root = tmp_path_factory.mktemp(f"ti-{request.param}")
    parts = lora.load_parts(textual_inversion=SETTINGS, pretrained=folder)
    opt = partial(torch.optim.AdamW, lr=3e-2)
    m = StableDiffusionModule(parts, opt, ema=EMA(decay=0.5, warmup=False), caption_dropout=0.0)
    init = {n: t.added.detach().clone() for n, t in ti.embeddings(m.text_encoder).items()}
    ckpt = fit(m, 3, root, sdxl)
    return {"module": m, "ckpt": ckpt, "folder": folder, "root": root, "init": init, "sdxl": sdxl}


def weights(*models: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `models`, the added rows left out."""
    return {
        f"{i}.{k}": v
        for i, m in enumerate(models)
        for k, v in m.state_dict().items()
        if not k.endswith(".added")
    }


def test_only_the_new_rows_train(run):
    """The tokenizer knows the tokens; each encoder's rows started as the init word's embedding
    and moved; every other weight (U-Net, VAE, text encoders' own) is bit for bit the folder's;
    the optimizer, the EMA and the checkpoint hold only the added rows."""
    m, folder = run["module"], run["folder"]
    fresh = load_parts(folder)
    for name, model, tokenizer in ti.pairs(fresh.text_encoder, fresh.tokenizer):
        table = model.get_input_embeddings().weight
        (init_id,) = tokenizer(INIT, add_special_tokens=False).input_ids
        key = next(k for k in run["init"] if k.startswith(name))  # "" starts every key
        assert torch.equal(run["init"][key], table[init_id].expand(VECTORS, -1))
    tables = ti.embeddings(m.text_encoder)
    assert len(tables) == (2 if run["sdxl"] else 1)
    for name, table in tables.items():
        assert not torch.allclose(table.added, run["init"][name])  # trained
        assert table.names == [TOKEN, f"{TOKEN}_1"]
    ours, theirs = (ti.pairs(p.text_encoder, p.tokenizer) for p in (m, fresh))
    for (_, _, tokenizer), (_, _, base) in zip(ours, theirs, strict=True):
        assert len(tokenizer) == len(base) + VECTORS
    # the trained modules' own weights: bit-equal to a fresh load's
    ours = weights(m.unet, m.vae, m.text_encoder)
    theirs = weights(fresh.unet, fresh.vae, fresh.text_encoder)
    theirs = {k.replace("token_embedding.weight", "token_embedding.base.weight"): v
              for k, v in theirs.items()}  # fmt: skip
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [
        k for k in ours if not torch.equal(ours[k], theirs[k])
    ][:3]
    added = {f"text_encoder.{n}.added" for n in tables}
    assert {n for n, _ in m.trainable_parameters()} == added
    (group,) = m.optimizers().optimizer.param_groups  # the U-Net frozen: no group of its own
    assert len(group["params"]) == len(added)
    assert set(m.ema.shadow) == added
    ckpt = checkpoint.load(run["ckpt"])
    assert set(ckpt["state_dict"]) == added
    assert checkpoint.run_info(ckpt)["textual_inversion"] == SETTINGS | {"train_unet": False}


@torch.no_grad()
def trained_encoding(m: StableDiffusionModule, prompt: str) -> dict[str, torch.Tensor]:
    """The prompt's conditioning as the trained module encodes it (raw weights)."""
    return m.family.condition(m.text_encoder, tokenize(m.tokenizer, prompt))


@torch.no_grad()
def pipeline_encoding(pipe, prompt: str, sdxl: bool) -> dict[str, torch.Tensor]:
    if sdxl:
        context, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        return {"context": context, "pooled": pooled}
    context, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
    return {"context": context}


def fresh_pipeline(folder: Path, sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(folder)


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_embedding_file_loads_in_diffusers(run, tmp_path: Path):
    """`--embedding`: `emb_params` (SD) or `clip_l` + `clip_g` (SDXL), loaded by diffusers'
    load_textual_inversion into a fresh pipeline of the tiny folder (SDXL's two keys into their
    own encoders, as diffusers' docs load them), gives the trained encoder's context (and pooled
    embedding) for a prompt with the token, to 1e-5; the pipeline without it does not."""
    m, sdxl = run["module"], run["sdxl"]
    (file,) = export_embedding(run["ckpt"], tmp_path / "emb", ema=False)
    assert file.name == "my-thing.safetensors"
    rows = load_file(file)
    assert set(rows) == ({"clip_l", "clip_g"} if sdxl else {"emb_params"})
    assert all(v.shape[0] == VECTORS and v.dtype == torch.float32 for v in rows.values())

    want = trained_encoding(m, PROMPT)
    pipe = fresh_pipeline(run["folder"], sdxl)
    assert not close(pipeline_encoding(pipe, PROMPT, sdxl), want)
    if sdxl:
        load = pipe.load_textual_inversion
        load(
            rows["clip_g"],
            token=TOKEN,
            text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )
        load(rows["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    else:
        pipe.load_textual_inversion(str(file), token=TOKEN)
    assert close(pipeline_encoding(pipe, PROMPT, sdxl), want)

    # the EMA's rows by default: the checkpoint's shadow
    (file,) = export_embedding(run["ckpt"], tmp_path / "ema")
    shadow = checkpoint.ema_state(checkpoint.load(run["ckpt"]))["shadow"]
    for name, key in (("te1.", "clip_l"), ("te2.", "clip_g")) if sdxl else (("", "emb_params"),):
        (row,) = [v for k, v in shadow.items() if k.startswith(f"text_encoder.{name}")]
        assert torch.equal(load_file(file)[key], row)


def test_sdtrain_export_embedding(run, tiny_model: Path, tmp_path: Path, capsys):
    """`sdtrain-export CKPT OUT --embedding` writes the files and their list; --lora beside it,
    or a run without new tokens, is refused with one line."""
    import json

    from sdtrain.cli.export import main

    main([str(run["ckpt"]), str(tmp_path / "emb"), "--embedding"])
    assert capsys.readouterr().out.split() == [
        "wrote",
        str(tmp_path / "emb" / "my-thing.safetensors"),
    ]
    index = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert index == {TOKEN: {"file": "my-thing.safetensors", "vectors": VECTORS}}
    with pytest.raises(SystemExit, match="already holds an export: pass --overwrite"):
        main([str(run["ckpt"]), str(tmp_path / "emb"), "--embedding"])
    main([str(run["ckpt"]), str(tmp_path / "emb"), "--embedding", "--overwrite"])
    with pytest.raises(SystemExit):
        main([str(run["ckpt"]), str(tmp_path / "both"), "--embedding", "--lora"])
    assert "--lora and --embedding each fill OUT" in capsys.readouterr().err
    plain = StableDiffusionModule(load_parts(tiny_model), partial(torch.optim.AdamW, lr=1e-3))
    plain_ckpt = fit(plain, 1, tmp_path / "plain", sdxl=False)
    with pytest.raises(SystemExit, match=r"trained no textual inversion .*without --embedding"):
        main([str(plain_ckpt), str(tmp_path / "none"), "--embedding", "--no-ema"])


def test_the_exported_folder_knows_the_tokens(run, tmp_path: Path):
    """A plain export: the folder's tokenizer(s) hold the tokens and its text encoder(s) their
    rows, so diffusers encodes the prompt as the trained module does; a single file keeps the
    original vocabulary (its tokens travel as embedding files)."""
    m, sdxl = run["module"], run["sdxl"]
    with m.ema_weights():
        want = trained_encoding(m, PROMPT)
    export(run["ckpt"], tmp_path / "out")
    assert close(pipeline_encoding(fresh_pipeline(tmp_path / "out", sdxl), PROMPT, sdxl), want)
    if sdxl:
        return
    export_single_file(run["ckpt"], tmp_path / "one.safetensors", dtype="fp32")
    (table,) = [
        v for k, v in load_file(tmp_path / "one.safetensors").items() if "token_embedding" in k
    ]
    assert table.shape[0] == len(load_parts(run["folder"]).tokenizer)


def test_bad_settings_are_named(tiny_model: Path):
    parts = load_parts(tiny_model)
    vocabulary = len(parts.tokenizer)
    add = partial(ti.add_textual_inversion, parts)
    cases = [
        ({"tokens": ["red"], "init_word": INIT}, r"tokens: 'red' is already in the tokenizer's vo"),
        ({"tokens": ["red</w>"], "init_word": INIT}, r"tokens: 'red</w>' is already in the token"),
        ({"tokens": [TOKEN], "init_word": "cat"}, r"init_word='cat' is 3 tokens .* not one: with"),
        ({"tokens": [TOKEN], "init_word": INIT, "vectors": 0}, r"vectors=0 must be a whole numb"),
        ({"tokens": ["<My-Thing>"], "init_word": INIT}, r"tokens: '<My-Thing>' has capitals"),
        ({"tokens": ["<a b>"], "init_word": INIT}, r"tokens: '<a b>' must be one word without s"),
        ({"tokens": [TOKEN, TOKEN], "init_word": INIT}, r"tokens names '<my-thing>' twice"),
        ({"tokens": [], "init_word": INIT}, r"tokens=\[\]: give a list of new tokens"),
        ({"tokens": [TOKEN], "init_word": ""}, r"init_word='': give the word"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=rf"model\.textual_inversion\.{message}"):
            add(**settings)
    assert len(parts.tokenizer) == vocabulary and not ti.embeddings(parts.text_encoder)
    with pytest.raises(ValueError, match=r"model\.textual_inversion\.init_wrod: no such key"):
        lora.load_parts(
            textual_inversion={"tokens": [TOKEN], "init_wrod": INIT}, pretrained=tiny_model
        )
    lora_te = {"text_encoder": True}
    with pytest.raises(ValueError, match=r"model\.lora\.text_encoder=True and model\.textual_inv"):
        lora.load_parts(lora_te, textual_inversion=SETTINGS, pretrained=tiny_model)
    parts = lora.load_parts(textual_inversion=SETTINGS, pretrained=tiny_model)
    with pytest.raises(ValueError, match=r"model\.train_text_encoder=True and model\.textual_in"):
        StableDiffusionModule(parts, torch.optim.AdamW, train_text_encoder=True)
    # three tokens for vectors=3: one row each
    parts = load_parts(tiny_model)
    ti.add_textual_inversion(parts, [TOKEN], "a red circle", vectors=3)
    (table,) = ti.embeddings(parts.text_encoder).values()
    ids = parts.tokenizer("a red circle", add_special_tokens=False).input_ids
    assert torch.equal(table.added, table.base.weight[ids])


def test_pooled_at_the_end_of_text_with_a_legacy_config(tiny_sdxl: Path):
    """Stability's text_encoder_2 config says eos_token_id 2, which transformers reads as "pool
    at the highest id": a new token's once tokens are added. The pooled embedding stays at the
    end-of-text token, as AUTOMATIC1111 and ComfyUI pool."""
    parts = load_parts(tiny_sdxl)
    te2 = parts.text_encoder.te2
    te2.text_model.eos_token_id = 2  # the legacy config
    ids = tokenize(parts.tokenizer.two, ["a red circle"])
    with torch.no_grad():
        want = te2(ids).text_embeds
    ti.add_textual_inversion(parts, [TOKEN], INIT)
    assert te2.text_model.eos_token_id == parts.tokenizer.two.eos_token_id
    new = tokenize(parts.tokenizer.two, [f"a red circle {TOKEN}"])
    with torch.no_grad():
        out = te2(new, output_hidden_states=True)
    eos = (new[0] == parts.tokenizer.two.eos_token_id).nonzero()[0, 0]
    assert torch.allclose(out.text_embeds, te2.text_projection(out.last_hidden_state[:, eos]))
    with torch.no_grad():
        assert torch.equal(te2(ids).text_embeds, want)  # prompts without the token: as before


# ---------------------------------------------------------------- through sdtrain-train


def ti_run(tmp: Path, tiny_model: Path, shards: str, steps: int, *extra: str) -> dict:
    """`experiment=textual_inversion` on the tiny model and the test shards (captions "a red
    circle", ... put into the experiment's template); the checkpoint it leaves."""
    from sdtrain.cli.train import train

    base = tiny_overrides(tiny_model, shards, steps=steps)
    cpu = ["trainer.precision=32-true", "data.resolution=32", "data.bucket_step=8", "logger=none"]
    cpu += ["callbacks.sample_images.height=32", "callbacks.sample_images.width=32"]
    # the horizon and checkpoint interval of both runs: a resume keeps its first run's horizon
    # (sdtrain.training.lr_schedule); no weight decay: a row no caption names stays as it was
    cpu += [
        "model.lr_scheduler.num_training_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    cpu += ["model.textual_inversion.init_word=red", "model.optimizer.weight_decay=0.0"]
    train(compose_cfg(tmp, ["experiment=textual_inversion", *base, *cpu, *extra]))
    return torch.load(tmp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


KEY = "text_encoder.embeddings.token_embedding.added"


def test_the_data_path_tokenizes_with_the_new_tokens(tiny_model: Path, shards: str, tmp_path):
    """The datamodule tokenizes the captions with the module's tokenizer: the template names
    the token, so its row moves from the init word's; the checkpoint keeps that row alone."""
    ckpt = ti_run(tmp_path, tiny_model, shards, 2)
    assert set(ckpt["state_dict"]) == {KEY}
    parts = load_parts(tiny_model)
    red = parts.tokenizer("red", add_special_tokens=False).input_ids
    assert not torch.allclose(
        ckpt["state_dict"][KEY], parts.text_encoder.get_input_embeddings().weight[red]
    )
    assert (tmp_path / "samples" / "step_0000002.png").is_file()  # sampled with the token


def test_training_through_the_config_resumes_exactly(tiny_model: Path, shards: str, tmp_path):
    """A run stopped at step 2 and resumed to 4 ends where an uninterrupted 4-step run does,
    bit for bit: the rows, their EMA and the optimizer state."""
    whole = ti_run(tmp_path / "whole", tiny_model, shards, 4)
    ti_run(tmp_path / "split", tiny_model, shards, 2)
    resumed = ti_run(tmp_path / "split", tiny_model, shards, 4, "ckpt_path=last")
    key = KEY
    assert torch.equal(resumed["state_dict"][key], whole["state_dict"][key])
    shadow = lambda c: checkpoint.ema_state(c)["shadow"][key]  # noqa: E731
    assert torch.equal(shadow(resumed), shadow(whole))
    a, b = (c["optimizer_states"][0]["state"][0] for c in (resumed, whole))
    assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
