"""Training batches as a pure function of the step, so a resumed run sees the same data.

`StepBatchSampler` yields, for global batch b, the samples of a seeded per-epoch permutation
of the current pool; on resume it starts at the checkpoint's batch. The pool may be replaced
at every epoch boundary (parity alignment trains only where teacher and student disagree);
the pools in use are part of the sampler's state, which `SamplerState` keeps in checkpoints.
Under DDP each rank takes its slice of every global batch (Lightning's distributed sampler is off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Sampler

PoolFn = Callable[[int], list[int]]  # epoch -> indices to draw from in that epoch


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StepBatchSampler(Sampler[list[int]]):
    """Batch b of a run is always the same samples, whatever happened before it.

    Args:
        n: dataset size.
        batch_size: per-rank batch size.
        seed: permutation seed (epoch e uses seed + e).
        total_batches: batches per rank over the whole run (steps x gradient accumulation).
        pool_fn: called at the start of every epoch after the first with the epoch number,
            returns the dataset indices of that epoch (default: all of them).
    """

    def __init__(self, n: int, batch_size: int, seed: int, total_batches: int, pool_fn: PoolFn | None = None):
        self.n, self.batch_size, self.seed, self.total_batches = n, batch_size, seed, total_batches
        self.pool_fn = pool_fn
        self.start = 0  # first batch to yield (set on resume)
        self.epochs: list[dict[str, Any]] = [{"epoch": 0, "first_batch": 0, "pool": None}]

    def __len__(self) -> int:
        return self.total_batches

    def pool(self, record: dict[str, Any]) -> list[int]:
        return list(range(self.n)) if record["pool"] is None else record["pool"]

    def _order(self, record: dict[str, Any], global_batch: int) -> list[int]:
        pool = self.pool(record)
        while len(pool) < global_batch:  # a tiny pool (e.g. few disagreements) is cycled
            pool = pool + pool
        g = torch.Generator().manual_seed(self.seed + record["epoch"])
        return [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = _rank_and_world()
        gb = self.batch_size * world
        # the epoch the start batch falls in: the last recorded one that began at or before it
        self.epochs = [e for e in self.epochs if e["first_batch"] <= self.start] or self.epochs[:1]
        record = self.epochs[-1]
        order = self._order(record, gb)
        for b in range(self.start, self.total_batches):
            k = b - record["first_batch"]
            if (k + 1) * gb > len(order):
                epoch = record["epoch"] + 1
                pool = self.pool_fn(epoch) if self.pool_fn else None
                record = {"epoch": epoch, "first_batch": b, "pool": pool}
                self.epochs.append(record)
                order, k = self._order(record, gb), 0
            yield order[k * gb + rank * self.batch_size:k * gb + (rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs[-2:]}  # the newest epoch may be a prefetch past the checkpoint

    def load_state_dict(self, state: dict[str, Any], batches_done: int) -> None:
        self.epochs = list(state["epochs"])
        self.start = batches_done


class SamplerState(Callback):
    """Keeps the sampler's epochs/pools in checkpoints and restarts it at the checkpoint's batch."""

    def __init__(self, sampler: StepBatchSampler, accumulate: int = 1):
        self.sampler = sampler
        self.accumulate = accumulate

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._global_step = checkpoint["global_step"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self.sampler.load_state_dict(pending, trainer.global_step * self.accumulate)
            self._pending = None
