"""What the remote-shard tests share: fast retry settings and a data module made, drawn from and
compared batch for batch (tests/datamodules/test_remote_shards.py: HTTP, and
test_remote_stores.py: S3 and fsspec). Their fixtures (`shard_dir`, `fresh_clients`) are in
tests/datamodules/conftest.py; the servers in tests/remote_servers.py."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from sdtrain.datamodules.webdataset import WebDataModule

FAST = dict(retries=2, backoff_s=0.05, connect_timeout_s=2.0, stall_timeout_s=1.0)


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
