"""Fixtures of the remote-shard tests (test_remote_shards.py, test_remote_stores.py): the test
shards' folder, and the object-store clients cleared around a test (requested by those modules,
`pytestmark = pytest.mark.usefixtures("fresh_clients")`, so other tests here keep theirs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtrain.datamodules import stores


@pytest.fixture(scope="module")
def shard_dir(shards: str) -> Path:
    return Path(shards.split("{")[0])


@pytest.fixture
def fresh_clients():
    """Clients are made once per process and settings; a test's environment makes its own."""
    stores._clients.clear()
    yield
    stores._clients.clear()
