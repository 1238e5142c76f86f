"""Data order: reproducible for the same (seed, start step, rank, worker, pass), fresh otherwise."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from sdtrain.datamodules import order
from sdtrain.datamodules.position import DataPosition
from sdtrain.datamodules.webdataset import DataOrder, WebDataModule
from tests.conftest import cpu_trainer

SAMPLES, PER_SHARD = 96, 24  # the `shards` fixture: 4 shards x 24 samples


def make(shards: str, tiny_model: Path, **kw) -> WebDataModule:
    """A small, fast datamodule: 16 px, no flips, batches of 8, no worker processes."""
    args = dict(resolution=16, random_flip=False, batch_size=8, num_workers=0, shuffle_buffer=32)
    return WebDataModule(shards, str(tiny_model), **{**args, **kw})


def keys(dm: WebDataModule, n_batches: int) -> list[str]:
    """The sample keys of the first `n_batches` batches, in the order they arrive."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [k for b in islice(loader, n_batches) for k in b["keys"]]


def shard_of(key: str) -> int:
    """sdtrain-shards names samples by their global index ("000000024_00024")."""
    return int(key.split("_")[0]) // PER_SHARD


def shard_sequence(ks: list[str]) -> list[int]:
    """Shards in the order they are first read."""
    return list(dict.fromkeys(shard_of(k) for k in ks))


def test_resampled_order_follows_seed_and_start_step(shards: str, tiny_model: Path):
    n = 6  # 48 samples, half the data: enough for shard draws and the shuffle buffer to show
    first = keys(make(shards, tiny_model, seed=1), n)
    assert keys(make(shards, tiny_model, seed=1), n) == first  # same inputs, same data
    assert keys(make(shards, tiny_model, seed=2), n) != first
    resumed = make(shards, tiny_model, seed=1)
    resumed.set_start_step(10)  # a run resumed at step 10 must not replay steps 0..9's data
    assert keys(resumed, n) != first


def test_each_pass_covers_every_sample_once_in_a_new_shard_order(shards: str, tiny_model: Path):
    # shuffle_buffer=1 keeps samples in shard order, so the shard order can be read off the keys
    ks = keys(make(shards, tiny_model, resampled=False, shuffle_buffer=1), 3 * SAMPLES // 8)
    passes = [ks[i * SAMPLES : (i + 1) * SAMPLES] for i in range(3)]
    for p in passes:
        assert len(p) == len(set(p)) == SAMPLES  # every sample, none twice
        assert len(shard_sequence(p)) == 4  # whole shards one after another
    orders = [shard_sequence(p) for p in passes]
    assert orders[0] != orders[1] and len({tuple(o) for o in orders}) > 1
    # reproducible: the same datamodule settings give the same passes
    again = keys(make(shards, tiny_model, resampled=False, shuffle_buffer=1), 2 * SAMPLES // 8)
    assert again == ks[: 2 * SAMPLES]


def test_samples_are_shuffled_apart_in_each_pass(shards: str, tiny_model: Path):
    ks = keys(make(shards, tiny_model, resampled=False, shuffle_buffer=32), 2 * SAMPLES // 8)
    one, two = ks[:SAMPLES], ks[SAMPLES:]
    assert set(one) == set(two) and len(set(one)) == SAMPLES
    assert one != two
    assert one != sorted(one)  # mixed within and across shards, not file order
    # the same shard read in both passes comes out in a different sample order
    for shard in range(4):
        assert [k for k in one if shard_of(k) == shard] != [k for k in two if shard_of(k) == shard]


def test_seed_depends_on_every_input():
    base = DataOrder(seed=0, start_step=0, rank=0, world_size=2)
    draws = {
        "base": base.rng("samples", 0, 0).random(),
        "seed": DataOrder(1, 0, 0, 2).rng("samples", 0, 0).random(),
        "step": DataOrder(0, 10, 0, 2).rng("samples", 0, 0).random(),
        "rank": DataOrder(0, 0, 1, 2).rng("samples", 0, 0).random(),
        "pass": base.rng("samples", 1, 0).random(),
        "purpose": base.rng("shards", 0, 0).random(),
        "worker": base.rng("samples", 0, 1).random(),
    }
    assert len(set(draws.values())) == len(draws)
    assert base.rng("samples", 0, 0).random() == draws["base"]
    # the shard permutation ignores the rank, so every rank cuts the same permutation
    assert (
        DataOrder(0, 0, 1, 2).rng("shards", 0, worker=None).random()
        == base.rng("shards", 0, worker=None).random()
    )


def test_cursor_turns_worker_ids_and_starts_at_the_resume_point(monkeypatch: pytest.MonkeyPatch):
    """A resumed loader's worker 0 plays the worker that was next; each starts at its place."""
    resumed = DataOrder(seed=0, worker_offset=1, resume=((3, 40), (2, 16)))
    monkeypatch.setattr(order, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    cursor = order.Cursor(resumed)
    cursor.start()
    assert (cursor.worker, cursor.workers, cursor.passes, cursor.skip) == (0, 2, 3, 40)
    cursor.next_pass()
    assert (cursor.passes, cursor.skip) == (4, 0)
    fresh = order.Cursor(DataOrder())
    fresh.start()
    assert (fresh.worker, fresh.passes, fresh.skip) == (1, 0, 0)


def test_spawned_workers_split_by_rank_and_worker(shards: str, tiny_model: Path):
    """2 ranks x 2 spawned workers, resampled=false: each pass is cut into disjoint parts.

    webdataset's split_by_node reads the rank inside the worker; a spawned worker of a DDP rank
    sees no RANK variable and no process group there, so every rank used to read every shard.
    """
    per_rank_pass = SAMPLES // 2 // 8  # batches: 48 samples per rank and pass
    seen = {}
    for rank in range(2):
        dm = make(
            shards,
            tiny_model,
            resampled=False,
            num_workers=2,
            worker_start_method="spawn",
            shuffle_buffer=8,
        )
        dm.set_rank(rank, 2)
        seen[rank] = keys(dm, 2 * per_rank_pass)
    for p in range(2):
        parts = [set(seen[r][p * SAMPLES // 2 : (p + 1) * SAMPLES // 2]) for r in range(2)]
        assert not parts[0] & parts[1]  # no sample on both ranks
        assert len(parts[0]) == len(parts[1]) == SAMPLES // 2
        assert len(parts[0] | parts[1]) == SAMPLES  # and together every sample
    # the next pass deals the samples out anew
    rank0 = [set(seen[0][p * SAMPLES // 2 : (p + 1) * SAMPLES // 2]) for p in (0, 1)]
    assert rank0[0] != rank0[1]


@pytest.mark.parametrize("shards_used, ranks, workers", [(3, 2, 1), (1, 2, 2), (3, 2, 2)])
def test_each_sample_once_a_pass_for_any_shard_count(
    shards_used: int, ranks: int, workers: int, shards: str, tiny_model: Path
):
    """resampled=false on layouts that do not divide: 3 shards on 2 ranks, 1 shard on 2 ranks x
    2 workers. Every slot (rank, worker) gets an equal share of each pass (within one sample),
    no sample twice in a pass, and over 2 passes each sample at most twice. Splitting whole
    shards gave one rank 2 shards and the other 1, whose samples came twice as often."""
    urls = sorted(Path(shards.split("{")[0]).glob("*.tar"))[:shards_used]
    samples = shards_used * PER_SHARD
    per_slot = samples // (ranks * workers)  # each slot's share of a pass
    batch = 4
    steps = 2 * (per_slot // batch) * workers  # two passes, on each rank (no partial batches)
    drawn = {}
    for rank in range(ranks):
        dm = make([str(u) for u in urls], tiny_model, resampled=False, num_workers=workers,
                  batch_size=batch, shuffle_buffer=4)  # fmt: skip
        dm.set_rank(rank, ranks)
        drawn[rank] = keys(dm, steps)
    every = [k for r in drawn for k in drawn[r]]
    counts = {k: every.count(k) for k in set(every)}
    assert max(counts.values()) <= 2, sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    half = len(drawn[0]) // 2  # each rank's first pass
    first = [k for r in drawn for k in drawn[r][:half]]
    assert len(first) == len(set(first))  # no sample twice in a pass
    assert len(first) >= samples - ranks * workers * batch  # at most a partial batch per slot left


class KeyProbe(L.LightningModule):
    """One weight and the keys of every batch it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.keys += batch["keys"]
        return (self.w - batch["pixels"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class OrderProbe(WebDataModule):
    """Records the DataOrder each train_dataloader() call was built with."""

    def train_dataloader(self):
        self.orders = [*getattr(self, "orders", []), self.data_order()]
        return super().train_dataloader()


def fit(
    dm: WebDataModule,
    steps: int,
    ckpt: Path | None = None,
    callbacks: list | None = None,
    model: KeyProbe | None = None,
) -> tuple[L.Trainer, KeyProbe]:
    trainer = cpu_trainer(callbacks=callbacks, max_steps=steps)
    model = model or KeyProbe()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return trainer, model


def test_resume_starts_the_data_at_the_checkpoint_step(shards: str, tiny_model: Path, tmp_path):
    """Lightning restores the checkpoint before it asks for the train dataloader."""
    kw = dict(resolution=16, random_flip=False, batch_size=4, num_workers=0, seed=3)
    first = OrderProbe(shards, str(tiny_model), **kw)
    trainer, run = fit(first, steps=3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    assert [o.start_step for o in first.orders] == [0]

    resumed = OrderProbe(shards, str(tiny_model), **kw)
    trainer, rerun = fit(resumed, steps=6, ckpt=tmp_path / "step3.ckpt")
    assert trainer.global_step == 6
    assert [o.start_step for o in resumed.orders] == [3]
    assert rerun.keys != run.keys[: len(rerun.keys)]  # not the first run's first batches again


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_each_pass_where_it_stopped(
    workers: int, shards: str, tiny_model: Path, tmp_path: Path
):
    """resampled=false: stopped after 5 batches (an odd number, so with 2 workers the second is
    next) and resumed, the run trains on exactly the batches an uninterrupted run trains on,
    across the end of a pass (12 batches), random crops and flips included."""
    kw = dict(resolution=16, batch_size=8, num_workers=workers, resampled=False, seed=4)
    kw |= dict(random_flip=True, shuffle_buffer=16)

    def dm():
        return WebDataModule(shards, str(tiny_model), **kw)

    class PixelProbe(KeyProbe):  # the keys and the pixels, crop and flip included
        def training_step(self, batch, batch_idx):
            self.sums = [*getattr(self, "sums", []), batch["pixels"].sum(dim=(1, 2, 3))]
            return super().training_step(batch, batch_idx)

    _, whole = fit(dm(), steps=15, callbacks=[DataPosition()], model=PixelProbe())
    trainer, first = fit(dm(), steps=5, callbacks=[DataPosition()], model=PixelProbe())
    trainer.save_checkpoint(tmp_path / "step5.ckpt")
    assert first.keys == whole.keys[:40]
    trainer, rest = fit(
        dm(), 15, tmp_path / "step5.ckpt", callbacks=[DataPosition()], model=PixelProbe()
    )
    assert trainer.global_step == 15
    assert rest.keys == whole.keys[40:]
    assert torch.equal(torch.cat(rest.sums), torch.cat(whole.sums)[40:])
    # the position survives a resume with nothing drawn yet, and a second resume continues
    trainer.save_checkpoint(tmp_path / "step15.ckpt")
    _, whole20 = fit(dm(), steps=20, callbacks=[DataPosition()])
    _, last = fit(dm(), 20, tmp_path / "step15.ckpt", callbacks=[DataPosition()])
    assert last.keys == whole20.keys[120:]


def test_resampled_resume_draws_anew_as_a_run_started_at_that_step(
    shards: str, tiny_model: Path, tmp_path: Path
):
    """resampled=true keeps no pass to continue, so a resume draws anew (README: Resume): the
    same data as a fresh loader whose order starts at the checkpoint's step, not the data the
    uninterrupted run drew next, and not the first run's first batches again."""
    kw = dict(resolution=16, batch_size=8, num_workers=2, resampled=True, seed=4)
    kw |= dict(random_flip=False, shuffle_buffer=16)

    def dm():
        return WebDataModule(shards, str(tiny_model), **kw)

    _, whole = fit(dm(), 12, callbacks=[DataPosition()])
    trainer, first = fit(dm(), 6, callbacks=[DataPosition()])
    trainer.save_checkpoint(tmp_path / "step6.ckpt")
    _, rest = fit(dm(), 12, tmp_path / "step6.ckpt", callbacks=[DataPosition()])
    assert first.keys == whole.keys[:48] and rest.keys != whole.keys[48:]  # drawn anew
    fresh = dm()
    fresh.set_start_step(6)
    assert rest.keys == keys(fresh, 6) != first.keys


def test_resampled_walks_every_shard_once_per_round(shards: str, tiny_model: Path):
    """Each worker reads every shard once before any shard again, in a new order each round (with
    replacement, ~1/e of the shards were missing from any stretch as long as the shard count)."""
    ks = keys(make(shards, tiny_model, resampled=True, shuffle_buffer=1), 3 * SAMPLES // 8)
    rounds = [[shard_of(k) for k in ks[i * SAMPLES : (i + 1) * SAMPLES]] for i in range(3)]
    seqs = [list(dict.fromkeys(r)) for r in rounds]
    assert all(
        sorted(s) == [0, 1, 2, 3] and len(r) == SAMPLES for s, r in zip(seqs, rounds, strict=True)
    )
    assert len({tuple(s) for s in seqs}) > 1  # not the same order every round


def test_shuffle_buffer_fills_before_the_first_sample():
    """The first samples out mix the whole buffer: two 500-sample shards in a 1000-sample buffer
    give both from the start (webdataset's default starts handing out samples at 100, so a run's
    first batches came from its first shard)."""
    stage = order.ShuffleStage(1000, DataOrder(seed=0), order.Cursor(DataOrder(seed=0)))
    src = ({"shard": i // 500} for i in range(1000))
    first = [s["shard"] for s in islice(stage(src), 64)]
    assert 16 <= sum(first) <= 48  # about half from each shard


def test_endless_goes_past_empty_passes_and_names_a_rank_that_never_fills_a_batch():
    from sdtrain.datamodules.order import Endless

    passes = iter([[], [1, 2], [], [3]])  # a pass with no batch does not end the stream

    class Passes:
        def __iter__(self):
            return iter(next(passes, []))

    cursor = order.Cursor(DataOrder())
    assert list(islice(iter(Endless(Passes(), cursor, rank=0, max_empty=5)), 3)) == [1, 2, 3]
    assert cursor.passes == 3  # moved on once per pass, empty ones included
    with pytest.raises(RuntimeError, match=r"rank 1: 3 passes .* no usable sample"):
        list(Endless([], order.Cursor(DataOrder()), rank=1, max_empty=3))
