"""Weighted mixtures (`data.sources`, datamodules/mixture.py): samples drawn by weight through the
real webdataset reader with 2 DataLoader workers, per-source counters in a real sdtrain-train
run's CSV log, exact resume under aspect-ratio buckets, latent-cache sources, and bad entries
named (issue 30 item 4)."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from sdtrain.callbacks.data_sources import SourceCounts
from sdtrain.datamodules import batch as B
from sdtrain.datamodules.position import DataPosition
from sdtrain.datamodules.webdataset import WebDataModule
from tests.conftest import ROOT
from tests.datamodules.test_buckets import shaped  # noqa: F401  (fixture: shards of 4 shapes)
from tests.datamodules.test_data_order import PER_SHARD, KeyProbe, fit

WEIGHTS = {"big": 5.0, "mid": 3.0, "small": 2.0}  # shares 0.5, 0.3, 0.2


def shard_files(pattern: str) -> list[str]:
    return [str(p) for p in sorted(Path(pattern.split("{")[0]).glob("*.tar"))]


def three_sources(shards: str, **extra) -> list[dict]:
    """The `shards` fixture's 4 shards as three sources: big (shards 0 and 1, 48 samples), mid
    (shard 2) and small (shard 3), 24 samples each; `extra` adds keys per source name."""
    urls = shard_files(shards)
    parts = {"big": urls[:2], "mid": urls[2:3], "small": urls[3:]}
    return [
        {"name": n, "shards": parts[n], "weight": w, **extra.get(n, {})} for n, w in WEIGHTS.items()
    ]


def source_of(key: str) -> str:
    """The source a `shards` fixture sample belongs to, from its key ("000000050_00050": its
    global index, so its shard), not from what the mixture says."""
    return ["big", "big", "mid", "small"][int(key.split("_")[0]) // PER_SHARD]


def mixture(sources: list[dict], model: Path, **kw) -> WebDataModule:
    args = dict(resolution=16, random_flip=False, batch_size=16, num_workers=2, shuffle_buffer=16)
    return WebDataModule(None, str(model), sources=sources, **(args | kw))


# ---------------------------------------------------------------- drawn by weight


@pytest.mark.parametrize("resampled", [True, False])
def test_drawn_shares_match_the_weights(resampled: bool, shards: str, tiny_model: Path):
    """3200 samples through 2 workers: each source's count within 4 binomial standard deviations
    of n x share (sd = sqrt(n p (1 - p)): +-88 samples, 2.8 points, for the 0.2 source; the
    weights ignored, a uniform draw, would be off by 533 for the 0.5 one). Each sample's source
    record names the source its key comes from, and the source's caption template applies to
    its captions alone."""
    sources = three_sources(shards, mid={"caption_template": "a photo of {caption}"})
    dm = mixture(sources, tiny_model, resampled=resampled, seed=7)
    dm.setup("fit")
    batches = list(islice(dm.train_dataloader(), 200))
    keys = [k for b in batches for k in b[B.KEYS]]
    said = [s for b in batches for s in b[B.SOURCES]]
    assert said == [source_of(k) for k in keys]
    n, counts = len(keys), Counter(said)
    assert n == 3200
    total = sum(WEIGHTS.values())
    for name, weight in WEIGHTS.items():
        p = weight / total
        assert abs(counts[name] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (name, counts)
    for b in batches:
        assert set(b[B.SKIPPED_SOURCES]) == set(WEIGHTS) and not any(b[B.SKIPPED_SOURCES].values())
        for source, caption in zip(b[B.SOURCES], b[B.CAPTIONS], strict=True):
            assert caption.startswith("a photo of ") == (source == "mid"), (source, caption)


def test_a_pass_reads_every_source_to_its_end(shards: str, tiny_model: Path):
    """data.resampled=false, one worker: the first pass ends when the last source has run out
    (every sample of every source drawn), and a source that ran out before came round again."""
    dm = mixture(three_sources(shards), tiny_model, resampled=False, num_workers=0, batch_size=4)
    dm.setup("fit")
    passes: dict[int, list[str]] = {}
    for batch in islice(dm.train_dataloader(), 120):
        passes.setdefault(batch[B.POSITION][2], []).extend(batch[B.KEYS])
    first = passes[0]
    assert len(passes) > 1 and len(set(first)) == 96  # every sample of every source
    per_source = Counter(source_of(k) for k in first)
    # small (24 samples, share 0.2) ends a pass last in expectation: ~120 draws; big (48 at 0.5)
    # and mid (24 at 0.3) come round again meanwhile
    assert per_source["big"] > 48 or per_source["mid"] > 24


def test_ranks_deal_out_the_batches_of_one_stream(shards: str, tiny_model: Path):
    """data.resampled=false: every rank and worker forms the same batches from one mixed stream
    a pass and keeps its share, so rank r of 2 (one worker each) trains the batches worker r of a
    single rank with 2 workers makes (the DataLoader takes them in turn: 0, 1, 0, ...)."""
    kw = dict(resampled=False, batch_size=4, seed=2)

    def batches(dm: WebDataModule, n: int) -> list[tuple]:
        dm.setup("fit")
        return [(tuple(b[B.KEYS]), tuple(b[B.SOURCES])) for b in islice(dm.train_dataloader(), n)]

    one = batches(mixture(three_sources(shards), tiny_model, num_workers=2, **kw), 40)
    for rank in (0, 1):
        dm = mixture(three_sources(shards), tiny_model, num_workers=1, **kw)
        dm.set_rank(rank, 2)
        assert batches(dm, 20) == one[rank::2]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, match",
    [
        ({"weight": 0}, r"data.sources\[1\].weight=0 \(mid\) must be a number > 0"),
        ({"weight": -2.0}, r"data.sources\[1\].weight=-2.0 \(mid\) must be a number > 0"),
        ({"weight": None}, r"data.sources\[1\].weight=None \(mid\) must be a number > 0"),
        ({"name": None}, r"data.sources\[1\].name is missing"),
        ({"name": "big"}, r"data.sources\[1\].name='big' is also data.sources\[0\]'s"),
        ({"name": "a b"}, r"data.sources\[1\].name='a b' must be letters"),
        ({"name": "decode"}, r"data.sources\[1\].name='decode' is a skip kind"),
        ({"shards": []}, r"data.sources\[1\].shards=\[\] \(mid\) names no shards"),
        ({"shards": None}, r"data.sources\[1\].shards=None \(mid\) names no shards"),
        ({"wieght": 1}, r"data.sources\[1\] has unknown key\(s\) \['wieght'\]"),
        ({"caption_template": "no slot"}, r"data.sources\[1\].caption_template='no slot' lacks"),
    ],
)
def test_bad_entries_are_named(change: dict, match: str, shards: str, tiny_model: Path):
    sources = three_sources(shards)
    sources[1] = {k: v for k, v in (sources[1] | change).items() if v is not None or k != "name"}
    with pytest.raises(ValueError, match=match):
        mixture(sources, tiny_model)


def test_sources_and_train_shards_are_refused_together(shards: str, tiny_model: Path, tmp_path):
    with pytest.raises(ValueError, match=r"data.train_shards='.*' and data.sources are both set"):
        WebDataModule(shards, str(tiny_model), sources=three_sources(shards))
    with pytest.raises(ValueError, match=r"data.train_shards=null and data.sources=null"):
        WebDataModule(None, str(tiny_model))
    with pytest.raises(ValueError, match=r"data.sources=\[\] must be a non-empty list"):
        mixture([], tiny_model)
    with pytest.raises(FileNotFoundError, match=r"data.sources\[0\].shards \(big\): folder"):
        mixture([{"name": "big", "shards": f"{tmp_path}/none/", "weight": 1}], tiny_model)


# ---------------------------------------------------------------- exact resume, buckets


@pytest.fixture(scope="module")
def bucket_sources(shaped, shards: str) -> list[dict]:  # noqa: F811  (the imported fixture)
    """Three sources of different shapes under buckets: the `shaped` fixture's two shards
    (square and tall; wide and wider: 14 samples each) and one of the demo's 32 px squares."""
    shaped_urls = shard_files(shaped[0])
    return [
        {"name": "upright", "shards": shaped_urls[0], "weight": 2},
        {"name": "wide", "shards": shaped_urls[1], "weight": 1},
        {"name": "shapes", "shards": shard_files(shards)[0], "weight": 1},
    ]


def test_resume_trains_the_batches_of_an_uninterrupted_run(
    bucket_sources: list[dict], tiny_model: Path, tmp_path: Path
):
    """data.resampled=false under buckets, 2 workers: stopped after 13 batches (odd: the second
    worker is next) and resumed, the run trains exactly the batches, crops and flips of an
    uninterrupted one, across the end of the first pass; every batch one shape."""

    def dm():
        return mixture(
            bucket_sources, tiny_model, resolution=48, batch_size=4, resampled=False, seed=3,
            buckets="auto", bucket_step=16, random_flip=True, shuffle_buffer=8,
        )  # fmt: skip

    class Probe(KeyProbe):  # keys, sources, pixels (crop and flip) and the pass of each batch
        def training_step(self, batch, batch_idx):
            self.sources = [*getattr(self, "sources", []), *batch[B.SOURCES]]
            self.sums = [*getattr(self, "sums", []), batch[B.PIXELS].sum(dim=(1, 2, 3))]
            self.passes = [*getattr(self, "passes", []), batch[B.POSITION][2]]
            return super().training_step(batch, batch_idx)

    _, whole = fit(dm(), steps=40, callbacks=[DataPosition()], model=Probe())
    assert whole.passes[-1] >= 1  # the run crossed into a second pass
    trainer, first = fit(dm(), steps=13, callbacks=[DataPosition()], model=Probe())
    trainer.save_checkpoint(tmp_path / "step13.ckpt")
    trainer, rest = fit(
        dm(), 40, tmp_path / "step13.ckpt", callbacks=[DataPosition()], model=Probe()
    )
    assert trainer.datamodule.order.resume  # continued from the saved position, not anew
    assert first.keys + rest.keys == whole.keys
    assert first.sources + rest.sources == whole.sources
    assert torch.equal(torch.cat(first.sums + rest.sums), torch.cat(whole.sums))
    assert set(whole.sources) == {"upright", "wide", "shapes"}


def test_changed_weights_start_the_order_anew(bucket_sources: list[dict], tiny_model: Path):
    """A data position holds only under the same mixture: other weights change the layout."""
    changed = [dict(s) for s in bucket_sources]
    changed[0]["weight"] = 3
    layouts = [mixture(s, tiny_model).layout(1)["sources"] for s in (bucket_sources, changed)]
    assert layouts[0] != layouts[1]


# ---------------------------------------------------------------- counters in a real run


def write_shard(path: Path, good: int, uncaptioned: int) -> None:
    """`good` captioned 32 px PNGs and `uncaptioned` ones without a caption (skipped as
    no_caption), interleaved."""
    with tarfile.open(path, "w") as tar:
        for i in range(good + uncaptioned):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (200, 10 * (i % 20), 40)).save(buf, format="PNG")
            files = {"png": buf.getvalue()}
            if i % (good + uncaptioned) >= uncaptioned:
                files["txt"] = b"a red square"
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def metric_rows(run: Path) -> list[dict[str, str]]:
    """The rows with per-source counters of the run's latest CSV log (a resume writes a new one)."""
    logs = sorted(run.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    return [r for r in csv.DictReader(logs[-1].open()) if r.get("data/drawn/shapes")]


class SourceProbe(KeyProbe):
    """Each batch's source record, as the callback gets it."""

    def training_step(self, batch, batch_idx):
        self.records = [*getattr(self, "records", []), (batch[B.SOURCES], batch[B.SKIPPED_SOURCES])]
        return super().training_step(batch, batch_idx)


def test_counters_sum_the_batches_records_and_go_on_after_a_resume(
    shards: str, tiny_model: Path, tmp_path: Path
):
    """`SourceCounts` logs, at each step, the samples drawn (taken or skipped) and skipped per
    source over all batches so far; a checkpoint keeps them and a resumed run counts on."""
    broken = tmp_path / "broken"
    broken.mkdir()
    write_shard(broken / "00000.tar", good=12, uncaptioned=6)
    sources = [
        {"name": "shapes", "shards": shard_files(shards)[0], "weight": 1},
        {"name": "broken", "shards": f"{broken}/", "weight": 1},
    ]

    def run(steps: int, ckpt: Path | None = None) -> tuple[L.Trainer, SourceProbe]:
        dm = mixture(sources, tiny_model, batch_size=4, num_workers=0, resampled=False)
        trainer = L.Trainer(
            callbacks=[DataPosition(), SourceCounts()], accelerator="cpu", max_steps=steps,
            logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        model = SourceProbe()
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return trainer, model

    def totals(records) -> dict[str, tuple[int, int]]:
        out = {}
        for name in ("shapes", "broken"):
            skipped = sum(r[1][name] for r in records)
            out[name] = (sum(r[0].count(name) for r in records) + skipped, skipped)
        return out

    trainer, first = run(6)
    trainer.save_checkpoint(tmp_path / "step6.ckpt")
    last = metric_rows(tmp_path)[-1]
    logged = {n: (float(last[f"data/drawn/{n}"]), float(last[f"data/skipped/{n}"])) for n in
              ("shapes", "broken")}  # fmt: skip
    assert logged == totals(first.records) and logged["broken"][1] > 0
    _, rest = run(9, tmp_path / "step6.ckpt")
    last = metric_rows(tmp_path)[-1]
    assert last["step"] == "8"  # the resumed run's own log, at its last step
    expected = totals(first.records + rest.records)
    assert {n: (float(last[f"data/drawn/{n}"]), float(last[f"data/skipped/{n}"]))
            for n in ("shapes", "broken")} == expected  # fmt: skip


@pytest.mark.slow  # two 2-rank sdtrain-train runs: ~80 s on 2 cores
def test_counters_reach_the_csv_log_and_resume(shards: str, tiny_model: Path, tmp_path: Path):
    """`sdtrain-train data=mixture` on 2 DDP ranks (gloo) with one clean source and one with
    uncaptioned samples: data/drawn/<name> and data/skipped/<name> in metrics.csv, summed over
    the ranks: the drawn add up to both ranks' batches plus the skipped, the skipped to the
    run's data/skipped; a resumed run counts on."""
    broken = tmp_path / "broken"
    broken.mkdir()
    write_shard(broken / "00000.tar", good=12, uncaptioned=6)
    run = tmp_path / "run"
    args = [
        f"hydra.run.dir={run}", "data=mixture", f"model.pretrained={tiny_model}",
        f"data.sources.0.shards={shard_files(shards)[0]}", "data.sources.0.name=shapes",
        f"data.sources.1.shards={broken}/", "data.sources.1.name=broken",
        "data.sources.1.weight=0.5", "data.resolution=32", "data.batch_size=4",
        "data.num_workers=1", "data.resampled=false", "data.shuffle_buffer=8",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.max_steps=6", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "logger=csv", "callbacks.sample_images=null",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sdtrain.cli.train"]
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = metric_rows(run)[-1]
    drawn = {n: float(last[f"data/drawn/{n}"]) for n in ("shapes", "broken")}
    skipped = {n: float(last[f"data/skipped/{n}"]) for n in ("shapes", "broken")}
    assert skipped["shapes"] == 0 and skipped["broken"] > 0
    assert sum(drawn.values()) == 2 * 6 * 4 + sum(skipped.values())  # 2 ranks' batches
    assert float(last["data/skipped"]) == sum(skipped.values())
    assert float(last["data/skipped/no_caption"]) == skipped["broken"]

    resume = [*args, "ckpt_path=last", "trainer.max_steps=9"]
    proc = subprocess.run(cmd + resume, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = metric_rows(run)[-1]
    more = {n: float(after[f"data/drawn/{n}"]) for n in ("shapes", "broken")}
    more_skipped = {n: float(after[f"data/skipped/{n}"]) for n in ("shapes", "broken")}
    assert sum(more.values()) == 2 * 9 * 4 + sum(more_skipped.values())  # on, not from 0


# ---------------------------------------------------------------- latent-cache sources


def test_latent_caches_mix_and_images_do_not_join_them(
    shards: str, tiny_model: Path, tmp_path: Path
):
    """Two caches (sdtrain-cache-latents) as sources: batches of latents from both, by source;
    a cache and image shards in one mixture are refused, naming both, and so are caches made
    otherwise (one with the text encoder's contexts), naming what differs."""
    from sdtrain.cli.cache_latents import main as cache_main

    urls = shard_files(shards)
    for name, part, extra in (
        ("first", urls[:2], []), ("second", urls[2:], []), ("texts", urls[2:], ["--text"])
    ):  # fmt: skip
        cache_main([
            "::".join(part), str(tmp_path / name),
            "--pretrained", str(tiny_model), "--resolution", "32", "--batch-size", "24",
            "--num-workers", "0", "--accelerator", "cpu", *extra,
        ])  # fmt: skip
    sources = [
        {"name": "first", "shards": f"{tmp_path / 'first'}/", "weight": 1},
        {"name": "second", "shards": f"{tmp_path / 'second'}/", "weight": 1},
    ]
    dm = mixture(sources, tiny_model, resolution=None, center_crop=True, batch_size=8)
    dm.setup("fit")
    assert dm.latent_cache_info["folder"] == str(tmp_path / "first")
    batches = list(islice(dm.train_dataloader(), 12))
    shape = (8, *dm.latent_cache_info["latent_shape"])  # (B, 2C, h, w)
    assert all(tuple(b[B.LATENT_DIST].shape) == shape for b in batches)
    said = [s for b in batches for s in b[B.SOURCES]]
    keys = [k for b in batches for k in b[B.KEYS]]
    assert {"first", "second"} == set(said)
    assert all((source_of(k) == "big") == (s == "first") for k, s in zip(keys, said, strict=True))

    sources[1]["shards"] = urls[2]
    with pytest.raises(ValueError, match=r"mixes image shards and latent caches .*\(second\)"):
        mixture(sources, tiny_model, resolution=None)
    sources[1]["shards"] = f"{tmp_path / 'texts'}/"
    with pytest.raises(ValueError, match=r"\(second\) .* differ in text_encoder_fingerprint"):
        mixture(sources, tiny_model, resolution=None)
