"""Shards named by url, streamed: `https://`, `s3://` and any other protocol fsspec knows (`gs://`
with gcsfs installed, `az://`, `hf://`, ...), read as they arrive (no download first), retried
from the byte they stopped at, and skipped, never hanging, when they stay unreadable.

Clients (datamodules/stores.py), one maintained library per kind of store (pyproject says why):
- `http://`, `https://`: requests (already installed through diffusers and wandb): proxies,
  CA bundles and `~/.netrc` credentials from the standard places, a connect and a read timeout.
- `s3://` (AWS and S3-compatible stores: MinIO, Ceph, R2, GCS's interoperability endpoint): boto3
  (`pip install "sdtrain[s3]"`): AWS's standard credential chain (environment, `~/.aws/config` and
  `credentials`, SSO, instance roles), `AWS_ENDPOINT_URL` or `data.remote.endpoint_url` for an
  S3-compatible store, timeouts and ranged reads.
- other protocols: fsspec (a dependency of torch) and the package that implements the protocol
  (gcsfs for `gs://`), with that package's own credentials and timeouts.

`RetryingStream` is the same for all: a request that fails, stalls (no byte for
`stall_timeout_s`), or a body that ends before its length (a tar cut off mid-stream), is opened
again at the byte reached (an HTTP/S3 range request, pinned to the object's ETag so a changed
object is not spliced), after a backoff, at most `retries` times; then `RemoteShardError`, which
the reader counts as a `bad_shard` (datamodules/tars.py). Credentials never enter a url, a log
line or an error here: urls are shown through `redact` (no user:password@, no query string).
"""

from __future__ import annotations

import fnmatch
import glob
import io
import logging
import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from sdtrain.datamodules.stores import (
    OPENERS,
    RemoteSettings,
    Response,
    Truncated,
    list_objects,
    permanent,
    reason,
    unavailable,
)

log = logging.getLogger(__name__)

HTTP = ("http", "https")
BACKOFF_CAP_S = 30.0  # the longest wait between two attempts
READ_SIZE = 1 << 20  # the stream's buffer (tarfile asks for 10 KiB at a time)


class RemoteShardError(OSError):
    """A remote shard that could not be read (after its retries, or at once where retrying
    cannot help: not found, access denied); the message names the url (redacted) and why.
    `missing`: the store said it does not exist or is not ours to read (HTTP 404 or 403: S3
    answers 403 for a missing key to a caller who may not list the bucket)."""

    def __init__(self, url: str, why: str, missing: bool = False) -> None:
        super().__init__(f"{url}: {why}")
        self.why, self.missing = why, missing


# ---------------------------------------------------------------- urls


def scheme(url: str) -> str:
    """The url's protocol in lower case ("" for a local path)."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def client_kind(url: str) -> str | None:
    """Which client reads `url`: "http", "s3", "fsspec", or None (webdataset's own opener: local
    paths, `file://`, `pipe:` and protocols fsspec does not know)."""
    proto = scheme(url)
    if proto in HTTP:
        return "http"
    if proto == "s3":
        return "s3"
    if proto in ("", "file") or url.startswith("pipe:"):
        return None
    from fsspec.registry import known_implementations, registry

    return "fsspec" if proto in known_implementations or proto in registry else None


def is_remote(url: str) -> bool:
    return client_kind(url) is not None


def redact(url: str) -> str:
    """`url` as logs and counters show it: without user:password@ and with the query string
    (a presigned url's signature, a token) replaced by "?…"."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def check_clients(urls: list[str]) -> None:
    """Fail before training when a url's client is not installed, naming what to install."""
    for proto in sorted({scheme(u) for u in urls if client_kind(u) in ("s3", "fsspec")}):
        try:
            if proto == "s3":
                import boto3  # noqa: F401
            else:
                import fsspec

                fsspec.get_filesystem_class(proto)
        except ImportError as e:
            how = 'boto3: pip install "sdtrain[s3]"' if proto == "s3" else f"fsspec's reader: {e}"
            raise ValueError(f"data.train_shards: {proto}:// shards need {how}") from None


def list_shards(url: str, settings: RemoteSettings) -> list[str]:
    """The `*.tar` objects a remote folder (`s3://bucket/prefix/`) or glob
    (`s3://bucket/prefix/*.tar`) holds, sorted. Plain urls are returned as they are.

    Raises:
        ValueError: an `https://` folder or glob (HTTP has no listing), or the listing failed.
        FileNotFoundError: the listing holds no `.tar`.
    """
    kind, folder = client_kind(url), url.endswith("/")
    path = url.split("://", 1)[1]
    pattern = glob.has_magic(path) and kind != "http"  # "?" starts an http query string
    if not (folder or pattern):
        return [url]
    if kind == "http":
        raise ValueError(
            f"data.train_shards: {redact(url)} is an HTTP folder, which HTTP cannot list: name "
            "the shards, e.g. https://host/data/{00000..00099}.tar"
        )
    for attempt in range(settings.retries + 1):
        try:
            found = list_objects(url, kind, settings)
            break
        except Exception as e:
            if permanent(e) or attempt == settings.retries:
                why = reason(e, url, settings)
                raise ValueError(
                    f"data.train_shards: could not list {redact(url)}: {why}"
                ) from None
            time.sleep(backoff(settings, attempt + 1))
    if pattern:
        found = [u for u in found if fnmatch.fnmatchcase(u, url)]
    else:
        found = [u for u in found if u.endswith(".tar")]
    if not found:
        raise FileNotFoundError(f"data.train_shards: {redact(url)} holds no .tar shards")
    return sorted(found)


# ---------------------------------------------------------------- the stream


def backoff(settings: RemoteSettings, failures: int) -> float:
    """Seconds to wait after the `failures`-th failed attempt: `backoff_s` doubled each time, at
    most BACKOFF_CAP_S, jittered so that workers that failed together retry apart."""
    wait = min(BACKOFF_CAP_S, settings.backoff_s * 2 ** (failures - 1))
    return wait * random.uniform(0.5, 1.0)


class RetryingStream(io.RawIOBase):
    """A remote object read front to back, reopened at the byte reached when an attempt fails
    (see module docs). Opens the first attempt at once, so a missing shard fails here.

    Args:
        url: the shard.
        settings: retries, backoff and timeouts.
        opener: (url, offset, etag, settings) -> Response; by default the url's client.
        sleep: waits between attempts (tests pass a fake).
    """

    def __init__(
        self,
        url: str,
        settings: RemoteSettings,
        opener: Callable[..., Response] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.url, self.settings, self.sleep = url, settings, sleep
        self.opener = opener or OPENERS[client_kind(url) or "fsspec"]
        self.pos, self.failures = 0, 0
        self.size: int | None = None
        self.etag: str | None = None
        self.response: Response | None = None
        self.error: RemoteShardError | None = None
        self._connect()

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
        while True:
            try:
                self.response = self.opener(self.url, self.pos, self.etag, self.settings)
            except Exception as e:
                self._failed(e)
                continue
            self.size = self.response.size if self.response.size is not None else self.size
            self.etag = self.etag or self.response.etag
            return

    def _drop(self) -> None:
        if self.response is not None:
            try:
                self.response.close()
            except Exception:  # a broken connection may fail to close too
                pass
            self.response = None

    def _failed(self, e: Exception) -> None:
        """Wait before the next attempt, or raise RemoteShardError when none is left."""
        self._drop()
        self.failures += 1
        why = reason(e, self.url, self.settings)
        where = f" at byte {self.pos}" if self.pos else ""
        if permanent(e) or self.failures > self.settings.retries:
            tries = "" if permanent(e) else f" (after {self.failures} attempts)"
            why = f"{why}{where}{tries}"
            self.error = RemoteShardError(redact(self.url), why, missing=unavailable(e))
            raise self.error from None
        wait = backoff(self.settings, self.failures)
        log.warning(
            "%s: %s%s; retry %d of %d in %.2g s",
            redact(self.url),
            why,
            where,
            self.failures,
            self.settings.retries,
            wait,
        )
        self.sleep(wait)

    def readinto(self, buffer) -> int:
        if self.error is not None:  # gave up: every later read fails the same way
            raise self.error
        view = memoryview(buffer).cast("B")
        while True:
            if self.size is not None and self.pos >= self.size:
                return 0
            if self.response is None:
                self._connect()
            try:
                data = self.response.read(len(view))
                if not data and self.size is not None and self.pos < self.size:
                    raise Truncated(f"the response ended at byte {self.pos} of {self.size}")
            except Exception as e:
                self._failed(e)
                continue
            view[: len(data)] = data
            self.pos += len(data)
            return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_remote(url: str, settings: RemoteSettings) -> io.BufferedReader:
    """`url` as a buffered binary stream (RetryingStream); RemoteShardError if it cannot open."""
    return io.BufferedReader(RetryingStream(url, settings), buffer_size=READ_SIZE)


def read_remote(url: str, settings: RemoteSettings) -> bytes | None:
    """A small remote object's bytes (cache.json), or None when the store says it is not there
    or not ours to read (404, 403)."""
    try:
        with open_remote(url, settings) as f:
            return f.read()
    except RemoteShardError as e:
        if e.missing:
            return None
        raise
