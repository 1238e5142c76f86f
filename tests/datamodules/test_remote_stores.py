"""Shards streamed from object stores: an S3-compatible server the tests start (moto's server,
buckets made with boto3; tests/remote_servers.py) and fsspec's protocols (gs://, az://, ...).
S3 shards train as the same local shards do, from credentials where a user keeps them; a read
broken mid-stream resumes from the byte reached, never from another version of the object; and
the secret key is in no output of a run. HTTP shards and their failures:
test_remote_shards.py."""

from __future__ import annotations

import importlib.util
import io
from dataclasses import replace
from pathlib import Path

import pytest

from sdtrain.datamodules import remote, stores
from sdtrain.datamodules.remote import RemoteSettings, RetryingStream
from sdtrain.datamodules.tars import RemoteDataError
from sdtrain.datamodules.webdataset import expand_shards
from tests.datamodules.remote_helpers import FAST, draw, make, pattern, same_batches
from tests.remote_servers import SECRET, S3Server

boto3 = pytest.importorskip("boto3")  # the dev extra installs it (and moto); CI has both
pytest.importorskip("moto.server")
pytestmark = pytest.mark.usefixtures("fresh_clients")  # tests/datamodules/conftest.py

BUCKET = "sdtrain-shards"
RemoteShardErrorOrData = (remote.RemoteShardError, RemoteDataError)


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


# ---------------------------------------------------------------- S3


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


# ---------------------------------------------------------------- clients and other protocols


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
