"""Shards streamed from a real HTTP server the tests start (tests/datamodules/shard_server.py, its
own process, so it can be killed). Remote shards train as the same local shards do, batch for
batch; a 404, a stall past the timeout, a response cut off and a server killed mid-run are
retried, skipped and counted as `bad_shard`, or end the run with a clear message, and nothing
hangs. S3 (moto's server) and fsspec's protocols: test_remote_stores.py."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from sdtrain.datamodules.position import DataPosition
from sdtrain.datamodules.remote import RemoteSettings, redact
from sdtrain.datamodules.tars import RemoteDataError
from sdtrain.datamodules.webdataset import expand_shards
from tests.datamodules.remote_helpers import FAST, draw, make, pattern, same_batches, skipped
from tests.datamodules.test_data_order import KeyProbe, fit
from tests.remote_servers import SECRET, HttpServer

pytestmark = pytest.mark.usefixtures("fresh_clients")  # tests/datamodules/conftest.py


@pytest.fixture
def http(shard_dir: Path, tmp_path: Path):
    server = HttpServer(shard_dir, tmp_path / "requests.log")
    yield server
    server.kill()


# ---------------------------------------------------------------- remote = local


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(resampled=False), dict(num_workers=2)],
    ids=["resampled", "passes", "resampled-2-workers"],
)
def test_http_batches_equal_the_local_shards_batches(
    kw: dict, shards: str, http: HttpServer, tiny_model: Path
):
    """Same order, same pixels (random crops and flips included), same tokens. (Passes with
    several workers deal a local set's batches by its survey, which remote sets skip: their
    first slot is seeded instead, README: Remote shards.)"""
    local = draw(make(shards, tiny_model, **kw), 14)  # past a pass (12 batches)
    over_http = draw(make(pattern(f"{http.url}/ok"), tiny_model, **kw), 14)
    same_batches(over_http, local)
    assert skipped(over_http) == ({}, {})


# ---------------------------------------------------------------- failures


def test_a_404_is_skipped_at_once_and_counted_by_shard(
    shards: str, http: HttpServer, tiny_model: Path
):
    urls = [f"{http.url}/ok/0000{i}.tar" for i in range(4)] + [f"{http.url}/ok/missing.tar"]
    dm = make(urls, tiny_model, resampled=False, shuffle_buffer=1, remote=FAST)
    got = draw(dm, 12)  # one pass: all 96 samples, and the missing shard once
    assert sorted(k for b in got for k in b["keys"]) == sorted(
        k for b in draw(make(shards, tiny_model, resampled=False), 12) for k in b["keys"]
    )
    kinds, by_shard = skipped(got)
    assert kinds == {"bad_shard": 1} and by_shard == {f"{http.url}/ok/missing.tar": 1}
    assert len(http.requests("missing.tar")) == 1  # a 404 is not retried


@pytest.mark.slow  # waits on timeouts or servers: CI runs it (default suite near 10 min)
def test_a_stall_past_the_timeout_is_retried_then_skipped(http: HttpServer, tiny_model: Path):
    """/stall/ sends half a shard and then nothing: each attempt fails after stall_timeout_s
    (1 s), 1 + retries attempts, then the shard is skipped; the other shards train."""
    urls = [f"{http.url}/ok/00000.tar", f"{http.url}/stall/00001.tar"]
    start = time.monotonic()
    got = draw(make(urls, tiny_model, resampled=False, shuffle_buffer=1, remote=FAST), 3)
    took = time.monotonic() - start
    kinds, by_shard = skipped(got)
    assert kinds == {"bad_shard": 1} and list(by_shard) == [f"{http.url}/stall/00001.tar"]
    attempts = http.requests("/stall/00001.tar")
    assert len(attempts) == 1 + FAST["retries"]
    assert all(a.split()[2].startswith("bytes=") for a in attempts[1:])  # from the byte reached
    assert took < 15, took  # 3 stalls of 1 s and two short waits, not the server's 60 s


def test_a_first_attempt_that_stalls_recovers_on_retry(
    shards: str, http: HttpServer, tiny_model: Path
):
    urls = [f"{http.url}/stallfirst/0000{i}.tar" for i in range(2)]
    got = draw(make(urls, tiny_model, resampled=False, shuffle_buffer=1, remote=FAST), 6)
    assert skipped(got) == ({}, {})
    assert len({k for b in got for k in b["keys"]}) == 48  # both shards whole
    assert len(http.requests("/stallfirst/00000.tar")) == 2


def test_a_response_cut_off_resumes_from_the_byte_reached(
    shards: str, http: HttpServer, tiny_model: Path
):
    """/flaky/ cuts the first response at half: the retry asks for the rest (a range request),
    and the shard trains whole, nothing skipped, the batches those of the local shards."""
    kw = dict(resampled=False, remote=FAST)
    got = draw(make(pattern(f"{http.url}/flaky"), tiny_model, **kw), 13)
    same_batches(got, draw(make(shards, tiny_model, resampled=False), 13))
    assert skipped(got) == ({}, {})
    first, second = http.requests("/flaky/00000.tar")[:2]
    assert first.endswith(" -") and second.split()[2].startswith("bytes=")


def test_a_tar_cut_off_every_time_is_counted_and_its_whole_samples_kept(
    shard_dir: Path, http: HttpServer, tiny_model: Path
):
    """/truncate/ announces the whole length and sends half, every time: after the retries the
    rest of the shard is a `bad_shard`, counted once, and only whole samples came through."""
    url = f"{http.url}/truncate/00000.tar"
    dm = make([url, f"{http.url}/ok/00001.tar"], tiny_model, resampled=False, shuffle_buffer=1,
              remote=FAST)  # fmt: skip
    got = draw(dm, 5)
    kinds, by_shard = skipped(got)
    assert kinds == {"bad_shard": 1} and by_shard == {url: 1}
    keys = [k for b in got for k in b["keys"]]
    cut = [k for k in keys if k < "000000024"]  # shard 0's samples (000000000_… to 000000023_…)
    assert 0 < len(cut) < 24 and len(set(keys)) == len(keys)
    assert len(http.requests("/truncate/00000.tar")) == 1 + FAST["retries"]
    for b in got:  # every sample whole: an image and its caption
        assert len(b["captions"]) == len(b["keys"]) == b["pixels"].shape[0]


def test_local_truncated_tar_counts_one_bad_shard(shard_dir: Path, tmp_path: Path, tiny_model):
    """A local shard cut off in the middle of a member counts once (webdataset's reader counted
    the error and again the next header read of the same broken stream)."""
    data = (shard_dir / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 700])
    dm = make([str(tmp_path / "cut.tar"), str(shard_dir / "00001.tar")], tiny_model,
              resampled=False, shuffle_buffer=1)  # fmt: skip
    kinds, by_shard = skipped(draw(dm, 4))
    assert kinds == {"bad_shard": 1} and by_shard == {str(tmp_path / "cut.tar"): 1}


@pytest.mark.slow  # waits on timeouts or servers: CI runs it (default suite near 10 min)
def test_a_server_killed_mid_run_ends_the_stream_with_a_clear_message(
    http: HttpServer, tiny_model: Path
):
    settings = dict(FAST, max_failed_in_a_row=3)
    dm = make(pattern(f"{http.url}/ok"), tiny_model, shuffle_buffer=1, remote=settings)
    it = iter(dm.train_dataloader())
    next(it)
    http.kill()
    start = time.monotonic()
    with pytest.raises(RemoteDataError, match=r"3 remote shards in a row could not be read.*"
                       r"could not connect.*max_failed_in_a_row=3"):  # fmt: skip
        for _ in range(100):
            next(it)
    assert time.monotonic() - start < 15


@pytest.mark.slow  # waits on timeouts or servers: CI runs it (default suite near 10 min)
def test_a_server_back_within_the_retries_loses_nothing(
    shard_dir: Path, http: HttpServer, tiny_model: Path, tmp_path: Path
):
    """The server killed after the first batch and started again on its port: the reads that
    failed meanwhile are retried, and one pass still trains every sample once, none skipped."""
    kw = dict(resampled=False, shuffle_buffer=1, remote=dict(FAST, retries=5, backoff_s=0.5))
    it = iter(make(pattern(f"{http.url}/ok"), tiny_model, **kw).train_dataloader())
    got = [next(it)]
    http.kill()
    back = HttpServer(shard_dir, tmp_path / "again.log", port=http.port)
    try:
        got += [next(it) for _ in range(11)]
    finally:
        back.kill()
    keys = [k for b in got for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 96
    assert skipped(got) == ({}, {})


@pytest.mark.slow  # waits on timeouts or servers: CI runs it (default suite near 10 min)
def test_training_stops_with_the_message_when_the_server_dies(http: HttpServer, tiny_model):
    """Through Lightning: the DataLoader worker's error ends fit with it; nothing hangs."""
    settings = dict(FAST, max_failed_in_a_row=2)
    dm = make(pattern(f"{http.url}/ok"), tiny_model, num_workers=1, shuffle_buffer=1,
              remote=settings)  # fmt: skip

    class KillAtStep2(KeyProbe):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                http.kill()
            return super().training_step(batch, batch_idx)

    start = time.monotonic()
    with pytest.raises(RemoteDataError, match="remote shards in a row could not be read"):
        fit(dm, steps=200, model=KillAtStep2())
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------- resume


def test_exact_resume_over_http(http: HttpServer, tiny_model: Path, tmp_path: Path):
    """resampled=false: stopped after 5 batches and resumed, a run on HTTP shards trains on
    exactly the batches an uninterrupted one does (crops and flips included), as on local ones."""
    kw = dict(resampled=False, batch_size=8, seed=4, shuffle_buffer=16)

    def dm():
        return make(pattern(f"{http.url}/ok"), tiny_model, **kw)

    _, whole = fit(dm(), steps=15, callbacks=[DataPosition()])
    trainer, first = fit(dm(), steps=5, callbacks=[DataPosition()])
    trainer.save_checkpoint(tmp_path / "step5.ckpt")
    trainer, rest = fit(dm(), 15, tmp_path / "step5.ckpt", callbacks=[DataPosition()])
    assert trainer.global_step == 15
    assert first.keys + rest.keys == whole.keys


@pytest.mark.slow  # waits on timeouts or servers: CI runs it (default suite near 10 min)
def test_latents_cached_from_http_shards_and_trained_from_over_http(
    shard_dir: Path, http: HttpServer, tiny_model: Path, tmp_path: Path
):
    """sdtrain-cache-latents reads its source over HTTP; the cache folder, served over HTTP, is
    recognised as a latent cache (its cache.json read beside the shards) and gives the batches
    the local cache gives."""
    import json

    from sdtrain.cli.cache_latents import main

    out = tmp_path / "cache"
    main([pattern(f"{http.url}/ok"), str(out), "--pretrained", str(tiny_model), "--resolution",
          "16", "--num-workers", "0", "--accelerator", "cpu", "--retries", "1"])  # fmt: skip
    info = json.loads((out / "cache.json").read_text())
    assert info["samples"] == 96 and info["source"] == pattern(f"{http.url}/ok")
    served = HttpServer(out, tmp_path / "cache.log")
    try:
        urls = [f"{served.url}/ok/{name}" for name in info["shards"]]
        kw = dict(resolution=None, random_flip=False, resampled=False, batch_size=16)
        over_http = make(urls, tiny_model, **kw)
        assert over_http.latent_cache_info["folder"] == f"{served.url}/ok"
        got = draw(over_http, 6)
    finally:
        served.kill()
    want = draw(make(str(out), tiny_model, **kw), 6)
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["latent_dist"], b["latent_dist"])


# ---------------------------------------------------------------- urls, settings, secrets


def test_urls_are_shown_without_credentials():
    assert redact("https://user:pw@host/a/0.tar?X-Amz-Signature=abc&X-Amz-Credential=k") == (
        "https://host/a/0.tar?…"
    )
    assert redact("s3://bucket/a/0.tar") == "s3://bucket/a/0.tar"
    assert redact("/data/0.tar") == "/data/0.tar"


def test_a_presigned_urls_signature_is_in_no_log_or_counter(
    http: HttpServer, tiny_model: Path, caplog
):
    url = f"{http.url}/ok/missing.tar?X-Amz-Signature={SECRET}"
    dm = make([f"{http.url}/ok/00000.tar", url], tiny_model, resampled=False, shuffle_buffer=1,
              remote=FAST)  # fmt: skip
    with caplog.at_level("INFO"):  # what a run logs (verbose=true shows urllib3's own lines too)
        got = draw(dm, 4)
    assert skipped(got)[1] == {f"{http.url}/ok/missing.tar?…": 1}
    assert "missing.tar" in caplog.text and SECRET not in caplog.text


def test_http_folders_cannot_be_listed_and_bad_settings_are_named(tiny_model: Path):
    with pytest.raises(ValueError, match="HTTP folder, which HTTP cannot list"):
        expand_shards("https://host/data/")
    with pytest.raises(ValueError, match=r"data.remote.stall_timeout_s=0 must be a number > 0"):
        RemoteSettings(stall_timeout_s=0)
    with pytest.raises(ValueError, match=r"data.remote has no key 'retry'"):
        RemoteSettings.of({"retry": 3})


def test_the_readme_table_holds_the_config_defaults():
    """README's `data.remote.` table: every key, with the default conf/data/webdataset.yaml
    and RemoteSettings both have."""
    from omegaconf import OmegaConf

    from tests.conftest import CONF
    from tests.readme_blocks import README, table_rows

    rows = {r[0].strip("`"): r[1] for r in table_rows(README.read_text(), "| `data.remote.` |")}
    config = OmegaConf.load(CONF / "data" / "webdataset.yaml").remote
    defaults = asdict(RemoteSettings())
    assert set(rows) <= set(config) and dict(config) == defaults
    assert {k: float(v) for k, v in rows.items()} == {k: float(defaults[k]) for k in rows}
