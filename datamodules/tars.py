"""Shard urls -> raw samples: webdataset's tar reading (`tar_file_iterator`, `group_by_keys`)
over streams opened here: remote urls through `datamodules.remote` (retried, timed out), local
paths and `pipe:` through webdataset's own opener.

A shard that fails part way (a tar cut off, a store that stays down past its retries) is counted
once, by the `handler` the pipeline gives (`DecodeStage.shard_error`: a `bad_shard`), and the
sample it was in the middle of is dropped: the samples before it are whole, the rest is
skipped. `data.remote.max_failed_in_a_row` remote shards failing one after another end the
stream with `RemoteDataError` (the store is down or refuses us), rather than skipping forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from sdtrain.datamodules.remote import (
    RemoteSettings,
    RemoteShardError,
    is_remote,
    open_remote,
    redact,
)


class RemoteDataError(RuntimeError):
    """Too many remote shards in a row could not be read."""


class ShardFailed(Exception):
    """What the handler gets for a shard whose rest is skipped: args (message, shard url)."""


class TarSamples:
    """Pipeline stage: {"url": ...} items -> samples ({"__key__", "__url__", ext: bytes, ...}),
    as webdataset's `tarfile_to_samples`, each url opened as the module docs say.

    `__url__` is the url as `remote.redact` shows it (no credentials in counters or logs).

    Args:
        handler: called with a `ShardFailed` for each shard whose rest is skipped (or any error
            grouping the files); returns True to go on.
        settings: how remote shards are read (`data.remote`).
    """

    def __init__(
        self, handler: Callable[[Exception], bool], settings: RemoteSettings | None = None
    ) -> None:
        self.handler = handler
        self.settings = settings or RemoteSettings()
        self.failed_in_a_row = 0  # remote shards that could not be read, one after another

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        return group_by_keys(self.files(src), handler=self.handler)

    def files(self, src: Iterator[dict]) -> Iterator[dict]:
        """Each shard's files in order, the files of its last key held back until the next key
        starts (so a shard cut off inside a sample drops that sample whole), then {}: the end of
        the shard, where `group_by_keys` closes its last sample."""
        for item in src:
            url = item["url"]
            shown = redact(url)
            held: list[dict] = []
            try:
                stream = open_remote(url, self.settings) if is_remote(url) else gopen(url, "rb")
                with stream:
                    for file in tar_file_iterator(stream):
                        file["__url__"] = shown
                        if held and base_plus_ext(file["fname"])[0] != held[0]["key"]:
                            yield from (f["file"] for f in held)
                            held = []
                        held.append({"key": base_plus_ext(file["fname"])[0], "file": file})
            except Exception as e:
                if not self.failed(e, shown):
                    return
                continue
            yield from (f["file"] for f in held)
            yield {}
            self.failed_in_a_row = 0

    def failed(self, e: Exception, shown: str) -> bool:
        """Count a failed shard through the handler; raise past `max_failed_in_a_row`."""
        if isinstance(e, RemoteShardError):
            self.failed_in_a_row += 1
            limit = self.settings.max_failed_in_a_row
            if self.failed_in_a_row >= limit:
                raise RemoteDataError(
                    f"{self.failed_in_a_row} remote shards in a row could not be read, the last "
                    f"{e}: is the store up, and are the url and credentials right? (stops after "
                    f"data.remote.max_failed_in_a_row={limit})"
                ) from None
        message = e.why if isinstance(e, RemoteShardError) else f"{type(e).__name__}: {e}"
        return self.handler(ShardFailed(message, shown))
