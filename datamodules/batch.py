"""The batch contract: the keys a training batch may hold, named in one place.

A batch holds the image as `PIXELS`, `LATENT_DIST` or `LATENTS`, and the caption as `INPUT_IDS` or
`CONTEXT`; the training step encodes only what is missing, so cached latents or cached text
embeddings are a data concern, not a model change.

| key | shape, dtype | what |
| --- | --- | --- |
| `pixels` | (B, 3, H, W) float in [-1, 1] | images, encoded by the frozen VAE in the step |
| `latent_dist` | (B, 2C, H/f, W/f) float | the VAE posterior's mean and log-variance, concatenated on channels (diffusers' `latent_dist.parameters`, unscaled): the step samples it, as it does for pixels |
| `latents` | (B, C, H/f, W/f) float | VAE latents already sampled and multiplied by the VAE's scaling_factor |
| `input_ids` | (B, L) long; (B, 2, L) for SDXL | caption token ids (L = 77 for CLIP), encoded by the frozen text encoder; SDXL's hold both tokenizers' |
| `context` | (B, L, D) float | the family's context for the captions: the text encoder's last hidden states (SDXL: both encoders' penultimate ones, concatenated) |
| `pooled` | (B, P) float | SDXL: the second text encoder's pooled projection, cached with `context` |
| `captions` | list of B str | the caption text (for logs; optional) |
| `keys` | list of B str | the samples' WebDataset keys (optional) |
| `skipped` | int | unusable samples the loader dropped while making this batch (optional) |
| `skipped_kinds`, `skipped_shards` | {str: int} | the same by kind (`SKIP_KINDS`) and by shard url (optional) |
| `sources`, `skipped_sources` | list of B str; {str: int} | a mixture's (`data.sources`, `sdtrain.datamodules.mixture`): the source each sample was drawn from, and the unusable samples each source gave while making this batch (every source named, 0 included; optional) |
| `position` | [worker, workers, pass, drawn] ints | where the data stands after this batch: the DataLoader worker that made it (its virtual id), how many there are, its pass over the shards and the samples it has drawn in that pass (optional; `sdtrain.datamodules.position`) |
| `mask` | (B, 1, H, W) or (B, 1, H/f, W/f) float in [0, 1] | each image's loss mask (`data.mask`, `sdtrain.datamodules.masks`): at pixel resolution from image shards, on the latent grid from a latent cache; the step area-averages it to the latent grid and weights the loss by it (`sdtrain.training.masked_loss`; optional) |
| `original_size`, `crop_top_left` | (B, 2) long | each image's (height, width) as decoded (EXIF orientation applied), and the (top, left) of its crop in resized pixels, the left measured in the flipped image when it was flipped: SDXL's size conditioning (`sdtrain.models.sdxl.time_ids`), in every image batch and read back from a latent cache's KEY.json (`sdtrain.datamodules.transforms.size_conditioning`); unused by SD-1.x/2.x |
"""

from __future__ import annotations

from typing import Any

PIXELS = "pixels"
LATENTS = "latents"
LATENT_DIST = "latent_dist"
INPUT_IDS = "input_ids"
CONTEXT = "context"
POOLED = "pooled"  # SDXL's pooled text embedding, cached beside `context`
CAPTIONS = "captions"
KEYS = "keys"
SKIPPED = "skipped"
POSITION = "position"
SKIPPED_KINDS = "skipped_kinds"  # {kind: count} over SKIP_KINDS
SKIPPED_SHARDS = "skipped_shards"  # {shard url: count}
SOURCES = "sources"  # a mixture's: each sample's source name
SKIPPED_SOURCES = "skipped_sources"  # a mixture's: {source name: count}, every source
ORIGINAL_SIZE = "original_size"  # (B, 2) (height, width) before resizing
CROP_TOP_LEFT = "crop_top_left"  # (B, 2) (top, left) of the crop, resized pixels
MASK = "mask"  # (B, 1, H, W) loss mask in [0, 1] (data.mask); latent-grid from a latent cache
# Why a sample (or a shard's remainder) was skipped: logged as data/skipped/<kind>.
SKIP_KINDS = (
    "no_image",
    "decode",
    "too_large",
    "no_caption",
    "bad_caption",
    "bad_latent",
    "bad_shard",
    "no_mask",  # data.mask=file and no KEY.mask.png
    "bad_mask",  # a mask that does not decode, or not its image's size
)

IMAGE_KEYS = (LATENTS, LATENT_DIST, PIXELS)  # preferred first: latents skip the VAE encode
TEXT_KEYS = (CONTEXT, INPUT_IDS)  # preferred first: a context skips the text encoder


def _first(batch: dict[str, Any], keys: tuple[str, ...], what: str) -> str:
    for k in keys:
        if batch.get(k) is not None:
            return k
    raise KeyError(
        f"training batch has no {what}: it needs one of {list(keys)}, has {sorted(batch)} "
        "(see sdtrain.datamodules.batch)"
    )


def image_key(batch: dict[str, Any]) -> str:
    """The first of `IMAGE_KEYS` the batch holds; a KeyError naming them all if none."""
    return _first(batch, IMAGE_KEYS, "image")


def text_key(batch: dict[str, Any]) -> str:
    """`context` if the batch holds it, else `input_ids`; a KeyError naming both if neither."""
    return _first(batch, TEXT_KEYS, "caption")


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch, whichever image key it holds (for throughput monitors)."""
    return batch[image_key(batch)].shape[0]
