"""Deterministic, resumable batch order.

Every epoch is a permutation of the dataset drawn from ``(seed, stage, epoch)`` alone, cut into
global micro-batches of ``batch_size`` (an incomplete last batch is dropped, so every process gets
the same number of samples); process ``r`` of ``W`` takes the ``r``-th contiguous slice of each.
The state is one number, the micro-batches consumed, so a resumed run continues with exactly the
samples the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vlmkit.core.errors import VlmkitError


class StageBatchSampler:
    """Yields this process's index lists, endlessly (epoch after epoch), from ``start`` on."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int,
        stage_index: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        where: str = "stages",
    ):
        if batch_size % world_size:
            raise VlmkitError(
                f"{where}.batch_size: {batch_size} samples per micro-batch do not split over {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        if dataset_size < batch_size:
            raise VlmkitError(
                f"{where}.batch_size: {batch_size} is more than the stage's {dataset_size} samples; lower it"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.stage_index = stage_index
        self.rank = rank
        self.world_size = world_size
        self.start = start

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.stage_index) * 1_000_033 + epoch)
        return torch.randperm(self.dataset_size, generator=gen)

    def global_batch(self, consumed: int) -> list[int]:
        """The global micro-batch number ``consumed`` (0-based over the whole stage)."""
        epoch, pos = divmod(consumed, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        return order[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.world_size
        consumed = self.start
        cached_epoch, order = -1, None
        while True:
            epoch, pos = divmod(consumed, self.batches_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.epoch_order(epoch)
            batch = order[pos * self.batch_size : (pos + 1) * self.batch_size]
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
            consumed += 1
