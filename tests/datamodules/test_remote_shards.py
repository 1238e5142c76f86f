"""Shards streamed from real servers the tests start: an HTTP server (tests/datamodules/shard_server.py,
its own process, so it can be killed) and an S3-compatible one (moto's server, buckets made with
boto3). Remote shards train as the same local shards do, batch for batch; a 404, a stall past the
timeout, a response cut off and a server killed mid-run are retried, skipped and counted as
`bad_shard`, or end the run with a clear message, and nothing hangs."""

from __future__ import annotations

import importlib.util
import io
import time
from dataclasses import asdict, replace
from itertools import islice
from pathlib import Path

import pytest
import torch

from sdtrain.datamodules import remote, stores
from sdtrain.datamodules.position import DataPosition
from sdtrain.datamodules.remote import RemoteSettings, RetryingStream, redact
from sdtrain.datamodules.tars import RemoteDataError
from sdtrain.datamodules.webdataset import WebDataModule, expand_shards
from tests.datamodules.test_data_order import KeyProbe, fit
from tests.remote_servers import SECRET, HttpServer, S3Server

boto3 = pytest.importorskip("boto3")  # the dev extra installs it (and moto); CI has both
pytest.importorskip("moto.server")

BUCKET = "sdtrain-shards"
FAST = dict(retries=2, backoff_s=0.05, connect_timeout_s=2.0, stall_timeout_s=1.0)
RemoteShardErrorOrData = (remote.RemoteShardError, RemoteDataError)


@pytest.fixture(scope="module")
def shard_dir(shards: str) -> Path:
    return Path(shards.split("{")[0])


@pytest.fixture
def http(shard_dir: Path, tmp_path: Path):
    server = HttpServer(shard_dir, tmp_path / "requests.log")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def s3(shard_dir: Path, tmp_path_factory):
    """moto's S3 server, the test shards in s3://BUCKET/demo/, credentials and the endpoint in
    the environment as a user would set them (AWS config files out of reach)."""
    server = S3Server()
    server.put_shards(shard_dir, BUCKET, "demo")
    mp = pytest.MonkeyPatch()
    for k, v in server.env(tmp_path_factory.mktemp("aws")).items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    yield server.endpoint
    mp.undo()
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_clients():
    """Clients are made once per process and settings; a test's environment makes its own."""
    stores._clients.clear()
    yield
    stores._clients.clear()


def make(urls, tiny_model: Path, **kw) -> WebDataModule:
    args = dict(resolution=16, random_flip=True, batch_size=8, num_workers=0, shuffle_buffer=32)
    dm = WebDataModule(urls, str(tiny_model), **{**args, **kw})
    dm.setup("fit")
    return dm


def draw(dm: WebDataModule, n: int) -> list[dict]:
    return list(islice(iter(dm.train_dataloader()), n))


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["input_ids"], y["input_ids"])


def skipped(batches: list[dict]) -> tuple[dict[str, int], dict[str, int]]:
    """Summed {kind: n} and {shard: n} of the batches' skips."""
    kinds: dict[str, int] = {}
    shards: dict[str, int] = {}
    for b in batches:
        for k, n in b["skipped_kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
        for k, n in b["skipped_shards"].items():
            shards[k] = shards.get(k, 0) + n
    return {k: n for k, n in kinds.items() if n}, shards


def pattern(base: str) -> str:
    return f"{base}/{{00000..00003}}.tar"


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


def test_s3_shards_by_pattern_and_by_prefix_equal_the_local_ones(
    shards: str, s3: str, tiny_model: Path
):
    """s3://bucket/prefix/{00000..00003}.tar and the prefix's listing (every .tar under it, the
    README.txt beside them left out) read as the local shards, through AWS_ENDPOINT_URL."""
    by_prefix = expand_shards(f"s3://{BUCKET}/demo/")
    assert by_prefix == expand_shards(pattern(f"s3://{BUCKET}/demo"))
    assert by_prefix == expand_shards(f"s3://{BUCKET}/demo/*.tar")
    kw = dict(resampled=False)
    local = draw(make(shards, tiny_model, **kw), 13)
    same_batches(draw(make(f"s3://{BUCKET}/demo/", tiny_model, **kw), 13), local)


def test_s3_credentials_and_endpoint_from_a_profile_and_the_config(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path
):
    """No AWS_* keys in the environment: a named profile of ~/.aws/credentials, and the endpoint
    from data.remote.endpoint_url; without any credentials, the shards fail with a message
    saying where credentials come from (and the run stops: nothing can be read)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[trainer]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = {SECRET}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "trainer")
    settings = dict(FAST, endpoint_url=s3)
    dm = make(f"s3://{BUCKET}/demo/", tiny_model, remote=settings, resampled=False)
    assert len(dm.urls) == 4 and len(draw(dm, 2)) == 2

    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    stores._clients.clear()
    with pytest.raises(RemoteShardErrorOrData, match="no AWS credentials found"):
        stream = RetryingStream(f"s3://{BUCKET}/demo/00000.tar", RemoteSettings(**settings))
        stream.read(10)


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


def breaking_after(limit: int, calls: list):
    """An S3 opener whose first body breaks (a reset connection) after `limit` bytes; records
    each attempt's (offset, etag)."""

    def opener(url, offset, etag, settings):
        calls.append((offset, etag))
        response = stores.open_s3(url, offset, etag, settings)
        if len(calls) > 1:
            return response
        sent = [0]

        def read(n: int) -> bytes:
            if sent[0] >= limit:
                raise ConnectionResetError("Connection reset by peer")
            data = response.read(min(n, limit - sent[0]))
            sent[0] += len(data)
            return data

        return replace(response, read=read)

    return opener


def test_an_s3_read_broken_mid_stream_resumes_where_it_broke(s3: str, shard_dir: Path):
    """Against moto: the retry is a ranged GetObject from the byte reached, pinned to the first
    response's ETag (IfMatch), and the bytes come out whole."""
    url, calls = f"s3://{BUCKET}/demo/00000.tar", []
    stream = RetryingStream(url, RemoteSettings(**FAST), opener=breaking_after(5000, calls))
    assert io.BufferedReader(stream).read() == (shard_dir / "00000.tar").read_bytes()
    (first, etag0), (offset, etag) = calls
    assert (first, etag0, offset) == (0, None, 5000) and etag and etag.strip('"')


def test_an_s3_object_replaced_mid_read_is_not_spliced(s3: str, shard_dir: Path):
    """The object changes between two attempts: IfMatch fails (412), the shard is given up at
    once rather than finished from another version."""
    key, calls = "demo/replaced.tar", []
    client = boto3.client("s3", endpoint_url=s3)
    client.put_object(Bucket=BUCKET, Key=key, Body=(shard_dir / "00000.tar").read_bytes())
    opener = breaking_after(5000, calls)

    def replacing(url, offset, etag, settings):
        if calls:  # before the second attempt: a new version of the object
            client.put_object(Bucket=BUCKET, Key=key, Body=(shard_dir / "00001.tar").read_bytes())
        return opener(url, offset, etag, settings)

    stream = RetryingStream(f"s3://{BUCKET}/{key}", RemoteSettings(**FAST), opener=replacing)
    with pytest.raises(
        remote.RemoteShardError, match=r"PreconditionFailed \(HTTP 412\) at byte 5000$"
    ):
        io.BufferedReader(stream).read()
    assert len(calls) == 2


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


def test_a_missing_client_is_named_before_training(monkeypatch: pytest.MonkeyPatch):
    import builtins

    real_import = builtins.__import__

    def no_boto3(name, *args, **kw):
        if name == "boto3":
            raise ImportError("No module named 'boto3'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_boto3)
    with pytest.raises(ValueError, match=r's3:// shards need boto3: pip install "sdtrain\[s3\]"'):
        expand_shards("s3://bucket/{00000..00001}.tar")
    monkeypatch.setattr(builtins, "__import__", real_import)
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ValueError, match=r"gs:// shards need fsspec's reader: .*gcsfs"):
            expand_shards("gs://bucket/00000.tar")


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


def test_other_protocols_stream_through_fsspec(shard_dir: Path, tiny_model: Path):
    """gs://, az://, ... go through fsspec (gcsfs etc. installed): here its in-memory store."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for tar in sorted(shard_dir.glob("*.tar")):
        fs.pipe(f"/fsspec-shards/{tar.name}", tar.read_bytes())
    urls = expand_shards("memory://fsspec-shards/")
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"0000{i}.tar" for i in range(4)]
    kw = dict(resampled=False)
    same_batches(
        draw(make(urls, tiny_model, **kw), 4),
        draw(make(str(shard_dir / "{00000..00003}.tar"), tiny_model, **kw), 4),
    )


@pytest.mark.slow  # 30 s: a real run (W&B offline included) in a subprocess
def test_a_run_from_s3_trains_and_logs_no_secret(s3: str, tiny_model: Path, tmp_path: Path):
    """`sdtrain-train` on s3:// shards (one missing: a warning names it) with the secret key in
    the environment: the run trains, and the secret is in no output and no file of the run."""
    from tests.conftest import tiny_overrides
    from tests.test_train import _cli

    shards = [f"s3://{BUCKET}/demo/0000{i}.tar" for i in range(4)] + [f"s3://{BUCKET}/gone.tar"]
    listed = "[" + ",".join(f"'{u}'" for u in shards) + "]"
    args = [
        a
        for a in tiny_overrides(tiny_model, "unused", steps=2)
        if not a.startswith("data.train_shards")
    ]
    args += [
        f"data.train_shards={listed}",
        "data.remote.retries=1",
        "data.remote.backoff_s=0.05",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = _cli(args, tmp_path, timeout=300)  # the environment holds the secret key
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"s3://{BUCKET}/gone.tar" in out and "NoSuchKey" in out
    assert SECRET not in out
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
