"""Caption rewriting: a template, tag shuffling that keeps the first N tags, draws from the sample's
rng (so a resume rewrites each caption alike), read through real shards by WebDataModule."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from sdtrain.cli.shards import main as shards_main
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.captions import CaptionProcessor, caption_processor
from sdtrain.datamodules.transforms import LatentTransform
from sdtrain.datamodules.webdataset import WebDataModule
from sdtrain.models.parts import load_tokenizer, tokenize

TAGS = ["sks", "dog", "grass", "sunny", "tree", "red collar"]


def test_template_fills_the_caption():
    assert CaptionProcessor("a photo of {caption}")("sks dog") == "a photo of sks dog"
    assert CaptionProcessor("{caption}, best quality")("x {y}") == "x {y}, best quality"
    assert caption_processor(None, False, 3) is None  # nothing to change: no processor at all


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest():
    proc = CaptionProcessor(shuffle_tags=True, keep_tags=2)
    caption = "sks,dog , grass,, sunny, tree, red collar"  # stray spaces and an empty tag
    seen = set()
    for seed in range(40):
        tags = proc(caption, random.Random(seed)).split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags[2:]) == sorted(TAGS[2:])
        seen.add(tuple(tags))
    assert len(seen) > 10  # the rest really is shuffled
    # the shuffle is the rng's own: the same seed gives the same order
    rest = TAGS[2:]
    random.Random(7).shuffle(rest)
    assert proc(caption, random.Random(7)) == ", ".join(TAGS[:2] + rest)


def test_shuffle_then_template_and_other_separators():
    proc = CaptionProcessor(
        "a photo of {caption}", shuffle_tags=True, keep_tags=1, tag_separator="|"
    )
    out = proc("sks|dog|grass", random.Random(0))
    assert out.startswith("a photo of sks| ") and sorted(out[16:].split("| ")) == ["dog", "grass"]
    assert CaptionProcessor(shuffle_tags=True, keep_tags=9)("a, b", random.Random(0)) == "a, b"


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"template": "a photo"}, "data.caption_template"),
        ({"keep_tags": -1}, "data.keep_tags"),
        ({"keep_tags": 1.5}, "data.keep_tags"),
        ({"tag_separator": ""}, "data.tag_separator"),
    ],
)
def test_bad_options_name_their_key(kw: dict, key: str):
    with pytest.raises(ValueError, match=key):
        CaptionProcessor(**kw)


def test_a_cache_of_text_contexts_refuses_caption_options():
    files = {B.LATENT_DIST: "latent_dist.npy", B.CONTEXT: "context.npy"}
    proc = CaptionProcessor(shuffle_tags=True)
    with pytest.raises(ValueError, match="data.caption_template / data.shuffle_tags"):
        LatentTransform(files, "fp16", [8, 4, 4], proc)
    LatentTransform({B.LATENT_DIST: "latent_dist.npy"}, "fp16", [8, 4, 4], proc)  # tokenized: ok


@pytest.fixture(scope="module")
def tag_shards(tmp_path_factory) -> str:
    """24 images captioned with the same six tags, in 2 shards written by sdtrain-shards."""
    base = tmp_path_factory.mktemp("tags")
    (base / "images").mkdir()
    for i in range(24):
        Image.new("RGB", (40, 32), (10 * i, 80, 160)).save(base / "images" / f"{i:03d}.png")
        (base / "images" / f"{i:03d}.txt").write_text(", ".join(TAGS))
    shards_main(
        [str(base / "images"), str(base / "tars"), "--samples-per-shard", "12", "--keep-order"]
    )
    return str(base / "tars" / "{00000..00001}.tar")


def first_batch(shards: str, model: Path, **kw) -> dict:
    dm = WebDataModule(shards, str(model), resolution=32, batch_size=24, num_workers=0,
                       resampled=False, shuffle_buffer=1, **kw)  # fmt: skip
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_webdatamodule_rewrites_captions_deterministically(tag_shards: str, tiny_model: Path):
    kw = {"caption_template": "a photo of {caption}", "shuffle_tags": True, "keep_tags": 1}
    plain = first_batch(tag_shards, tiny_model)
    a, b = first_batch(tag_shards, tiny_model, **kw), first_batch(tag_shards, tiny_model, **kw)
    assert plain[B.CAPTIONS] == [", ".join(TAGS)] * 24
    assert a[B.CAPTIONS] == b[B.CAPTIONS]  # drawn from each sample's place in the data
    assert len(set(a[B.CAPTIONS])) > 5  # ... which differs from sample to sample
    for caption in a[B.CAPTIONS]:
        assert caption.startswith("a photo of sks, ")
        assert sorted(caption.removeprefix("a photo of sks, ").split(", ")) == sorted(TAGS[1:])
    assert (a[B.INPUT_IDS] == tokenize(load_tokenizer(tiny_model), a[B.CAPTIONS])).all()
    assert a[B.KEYS] == plain[B.KEYS]
    assert (a[B.PIXELS] == plain[B.PIXELS]).all()  # the crops draw as without the options


@pytest.mark.slow  # makes a real latent cache (~20 s on 2 cores)
def test_a_latent_cache_with_contexts_is_refused_at_setup(
    tag_shards: str, tiny_model: Path, tmp_path: Path
):
    from sdtrain.cli.cache_latents import main as cache_main

    out = tmp_path / "latents"
    cache_main([tag_shards, str(out), "--pretrained", str(tiny_model), "--resolution", "32",
                "--num-workers", "0", "--accelerator", "cpu", "--text"])  # fmt: skip
    dm = WebDataModule(str(out), str(tiny_model), resolution=None, num_workers=0, shuffle_tags=True)
    with pytest.raises(ValueError, match="cache again without --text"):
        dm.setup("fit")
    WebDataModule(str(out), str(tiny_model), resolution=None, num_workers=0).setup("fit")


def test_heldout_captions_get_the_template_in_written_order(tag_shards: str, tiny_model: Path):
    """The validation loss sees captions as prompts will read them: templated, tags unshuffled."""
    kw = {"caption_template": "a photo of {caption}", "shuffle_tags": True, "keep_tags": 1}
    dm = WebDataModule(tag_shards, str(tiny_model), resolution=32, batch_size=8, num_workers=0,
                       val_shards=tag_shards, **kw)  # fmt: skip
    dm.setup("fit")
    batches = [b for b in dm.heldout_dataloader()]
    captions = [c for b in batches for c in b[B.CAPTIONS]]
    assert captions and set(captions) == {"a photo of " + ", ".join(TAGS)}
