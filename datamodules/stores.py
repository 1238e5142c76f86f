"""The clients of each kind of store, for `datamodules.remote`, and their settings
(`RemoteSettings`, `data.remote`): open an object at a byte offset (`OPENERS`), list a prefix
(`list_objects`), and tell why an attempt failed and whether another can help (`reason`,
`permanent`, `unavailable`), without importing a client until it is used.

- `http://`, `https://`: requests, a connect and a read (stall) timeout, `Range` from the offset,
  `If-Match` the first response's ETag.
- `s3://`: boto3's client (its credential chain; `endpoint_url` from the settings, else boto3's
  own: `AWS_ENDPOINT_URL`, `~/.aws/config`), botocore's own retries off (RetryingStream counts
  them), a ranged `GetObject` pinned with `IfMatch`.
- anything else: fsspec's filesystem for the protocol, opened and seeked to the offset.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

READ_SIZE = 1 << 20  # bytes skipped per read where a server ignores a range request
CHUNK = 1 << 16  # the most one read waits for: a stall loses at most this much of what came


@dataclass(frozen=True)
class RemoteSettings:
    """How remote shards are read (`data.remote` in the config).

    Args:
        retries: attempts after the first, per shard, before it is skipped as `bad_shard`.
        backoff_s: the wait before the first retry; doubled each time (up to 30 s), with jitter
            so that many DataLoader workers do not retry in step.
        connect_timeout_s: a connection not made in this long fails the attempt.
        stall_timeout_s: a response that sends no byte for this long fails the attempt (a stall
            mid-shard as well as before the first byte).
        endpoint_url: an S3-compatible store's url (MinIO, Ceph, R2, ...); None: boto3's own
            (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `endpoint_url` in `~/.aws/config`, else AWS).
        anonymous: read public S3 buckets unsigned, without credentials.
        max_failed_in_a_row: this many shards in a row that no retry could read stop the run
            with an error (the store is down or the credentials are wrong), rather than skipping
            shard after shard forever.
    """

    retries: int = 3
    backoff_s: float = 1.0
    connect_timeout_s: float = 10.0
    stall_timeout_s: float = 30.0
    endpoint_url: str | None = None
    anonymous: bool = False
    max_failed_in_a_row: int = 16

    def __post_init__(self) -> None:
        for key, least in (("retries", 0), ("max_failed_in_a_row", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"data.remote.{key}={value!r} must be a whole number >= {least}")
        for key in ("backoff_s", "connect_timeout_s", "stall_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"data.remote.{key}={value!r} must be a number > 0")

    @classmethod
    def of(cls, config: Any) -> RemoteSettings:
        """From `data.remote` (a mapping, None for the defaults, or settings already)."""
        if isinstance(config, RemoteSettings):
            return config
        given = dict(config or {})
        known = set(asdict(cls()))
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(
                f"data.remote has no key {unknown[0]!r}; it takes {', '.join(sorted(known))}"
            )
        return cls(**given)


def scrub(text: str, url: str) -> str:
    """`text` with `url`'s secret parts (user:password, the query string) taken out."""
    parts = urlsplit(url) if "://" in url else None
    if parts is None:
        return text
    secrets = [parts.query, parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""]
    for secret in filter(None, secrets):
        text = text.replace(secret, "…")
    return text


# ---------------------------------------------------------------- why an attempt failed


class Truncated(OSError):
    """The body ended before the length the server announced."""


class HttpStatus(OSError):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status} {text}".strip())
        self.status = status


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def permanent(e: BaseException) -> bool:
    """Whether retrying cannot help: not found, access denied, a bad request, no credentials,
    the object changed while read, the client missing."""
    if isinstance(e, HttpStatus):
        return 400 <= e.status < 500 and e.status not in (408, 425, 429)
    names = _names(e)
    if "ClientError" in names:  # botocore: an S3 error response
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return 400 <= status < 500 and status not in (408, 429)
    if names & {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError"}:
        return True
    return isinstance(e, FileNotFoundError | PermissionError | ImportError | ValueError)


def unavailable(e: BaseException) -> bool:
    """Whether the store said the object is not there (404) or not ours to read (403)."""
    if isinstance(e, HttpStatus):
        return e.status in (403, 404)
    if "ClientError" in _names(e):
        return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 404)
    return isinstance(e, FileNotFoundError | PermissionError)


def reason(e: BaseException, url: str, settings: RemoteSettings | None = None) -> str:
    """A short, credential-free account of a failed attempt."""
    names = _names(e)
    if isinstance(e, HttpStatus | Truncated):
        return str(e)
    if "ClientError" in names:
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        return f"{err.get('Code', 'error')} (HTTP {meta.get('HTTPStatusCode', '?')})"
    if "NoCredentialsError" in names:
        return (
            "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "~/.aws/credentials; data.remote.anonymous=true for a public bucket)"
        )
    if names & {"ConnectTimeoutError", "ConnectTimeout"}:
        wait = f" in {settings.connect_timeout_s:g} s" if settings else ""
        return f"could not connect{wait}"
    if names & {"ReadTimeoutError", "ReadTimeout", "TimeoutError"}:
        stall = f" for {settings.stall_timeout_s:g} s" if settings else ""
        return f"stalled: no data{stall}"
    broken = {"ProtocolError", "IncompleteRead", "IncompleteReadError", "ChunkedEncodingError"}
    broken |= {"ResponseStreamingError", "ConnectionResetError", "ConnectionAbortedError"}
    if names & (broken | {"BrokenPipeError"}):
        return "the connection broke mid-stream"
    if names & {"EndpointConnectionError", "NewConnectionError", "ConnectionError"}:
        return "could not connect (refused or unreachable)"
    return f"{type(e).__name__}: {scrub(str(e), url)[:200]}"


# ---------------------------------------------------------------- clients


@dataclass
class Response:
    """One attempt's open body: `read(n)` (up to n bytes, what has come: a stall then loses little),
    `close()`, the object's full size (None: unknown) and its ETag (to pin the next range
    request to the same object)."""

    read: Callable[[int], bytes]
    close: Callable[[], None]
    size: int | None
    etag: str | None


_clients: dict[tuple, Any] = {}  # (pid, kind, settings) -> client; clients are not fork-safe


def _client(kind: str, settings: RemoteSettings, make: Callable[[], Any]) -> Any:
    key = (os.getpid(), kind, settings)
    if key not in _clients:
        _clients[key] = make()
    return _clients[key]


def _http_session(settings: RemoteSettings):
    import requests

    return _client("http", settings, requests.Session)


def _content_range(value: str | None, offset: int) -> int | None:
    """The total size a `Content-Range: bytes a-b/total` gives; OSError if it starts elsewhere."""
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    if m is None or int(m[1]) != offset:
        raise OSError(f"asked for bytes from {offset}, got Content-Range {value!r}")
    return None if m[2] == "*" else int(m[2])


def open_http(url: str, offset: int, etag: str | None, settings: RemoteSettings) -> Response:
    headers = {"Accept-Encoding": "identity"}  # the tar's own bytes, so offsets are the tar's
    if offset:
        headers["Range"] = f"bytes={offset}-"
    if etag:
        headers["If-Match"] = etag  # a changed object answers 412: never splice two versions
    timeout = (settings.connect_timeout_s, settings.stall_timeout_s)
    r = _http_session(settings).get(url, headers=headers, stream=True, timeout=timeout)
    if r.status_code >= 400:
        r.close()
        raise HttpStatus(r.status_code, r.reason or "")
    try:
        if r.status_code == 206:
            size = _content_range(r.headers.get("Content-Range"), offset)
        else:  # the server ignored the range: read past what was read before
            length = r.headers.get("Content-Length")
            size = int(length) if length and not r.headers.get("Content-Encoding") else None
            left = offset
            while left:
                got = r.raw.read(min(left, READ_SIZE))
                if not got:
                    raise Truncated(f"the response ended before byte {offset}")
                left -= len(got)
    except BaseException:
        r.close()
        raise
    read = getattr(r.raw, "read1", None) or (lambda n: r.raw.read(min(n, CHUNK)))
    return Response(read, r.close, size, r.headers.get("ETag"))


def _s3_split(url: str) -> tuple[str, str]:
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key


def _s3_client(settings: RemoteSettings):
    def make():
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.stall_timeout_s,
            retries={"total_max_attempts": 1},  # retries are RetryingStream's, counted there
            signature_version=UNSIGNED if settings.anonymous else None,
        )
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=settings.endpoint_url or None, config=config)

    return _client("s3", settings, make)


def open_s3(url: str, offset: int, etag: str | None, settings: RemoteSettings) -> Response:
    bucket, key = _s3_split(url)
    extra = {"Range": f"bytes={offset}-"} if offset else {}
    if etag:
        extra["IfMatch"] = etag
    r = _s3_client(settings).get_object(Bucket=bucket, Key=key, **extra)
    body = r["Body"]
    if offset:
        size = _content_range(r.get("ContentRange"), offset)
    else:
        size = r.get("ContentLength")
    return Response(lambda n: body.read(min(n, CHUNK)), body.close, size, r.get("ETag"))


def open_fsspec(url: str, offset: int, etag: str | None, settings: RemoteSettings) -> Response:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    f = fs.open(path, "rb", block_size=READ_SIZE)
    try:
        f.seek(offset)
        size = getattr(f, "size", None)
    except BaseException:
        f.close()
        raise
    return Response(lambda n: f.read(min(n, CHUNK)), f.close, size, None)


OPENERS = {"http": open_http, "s3": open_s3, "fsspec": open_fsspec}


# ---------------------------------------------------------------- listing


def list_objects(url: str, kind: str, settings: RemoteSettings) -> list[str]:
    """Every object under `url`'s prefix (up to its first glob character), as urls."""
    return _s3_list(url, settings) if kind == "s3" else _fsspec_list(url)


def _s3_list(url: str, settings: RemoteSettings) -> list[str]:
    bucket, key = _s3_split(url)
    prefix = re.split(r"[*?\[]", key, maxsplit=1)[0]
    pages = _s3_client(settings).get_paginator("list_objects_v2").paginate
    return [
        f"s3://{bucket}/{item['Key']}"
        for page in pages(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]


def _fsspec_list(url: str) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    found = fs.glob(path) if glob.has_magic(path) else fs.find(path)
    proto = url.split("://", 1)[0]
    return [f"{proto}://{p.split('://', 1)[-1]}" for p in found]
