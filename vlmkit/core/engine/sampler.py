"""Deterministic, resumable batch order over one or several datasets.

Each global micro-batch comes from ONE dataset (as Otter draws one data group per step), chosen in
proportion to the datasets' sizes or to recipe weights; within a dataset, every epoch is a
permutation drawn from ``(seed, stage, dataset, epoch)`` alone, cut into micro-batches of
``batch_size`` (an incomplete last batch is dropped, so every process gets the same number of
samples). Process ``r`` of ``W`` takes the ``r``-th contiguous slice of each micro-batch. The state
is one number, the micro-batches consumed, so a resumed run continues with exactly the samples the
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vlmkit.core.errors import VlmkitError

_BLOCK = 4096  # dataset choices are drawn in blocks, each from its own seed


class StageBatchSampler:
    """Yields this process's index lists (into the concatenation of the datasets), endlessly."""

    def __init__(
        self,
        dataset_sizes: list[int] | int,
        batch_size: int,
        *,
        seed: int,
        stage_index: int,
        weights: list[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        where: str = "stages",
        names: list[str] | None = None,
    ):
        sizes = [dataset_sizes] if isinstance(dataset_sizes, int) else list(dataset_sizes)
        names = names or [str(i) for i in range(len(sizes))]
        if batch_size % world_size:
            raise VlmkitError(
                f"{where}.batch_size: {batch_size} samples per micro-batch do not split over {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        for name, size in zip(names, sizes):
            if size < batch_size:
                raise VlmkitError(
                    f"{where}.batch_size: {batch_size} is more than the {size} samples of dataset '{name}'; lower it"
                )
        self.sizes = sizes
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        probs = torch.tensor(weights if weights is not None else sizes, dtype=torch.float64)
        self.probs = probs / probs.sum()
        self.batch_size = batch_size
        self.seed = seed
        self.stage_index = stage_index
        self.rank = rank
        self.world_size = world_size
        self.start = start

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in one pass over every dataset."""
        return sum(size // self.batch_size for size in self.sizes)

    def _seed(self, *parts: int) -> int:
        value = self.seed
        for p in (self.stage_index, *parts):
            value = value * 1_000_003 + p
        return value % (2**63)

    def epoch_order(self, dataset: int, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self._seed(dataset, epoch) if len(self.sizes) > 1 else self._seed(epoch))
        return torch.randperm(self.sizes[dataset], generator=gen)

    def _choices(self, block: int) -> torch.Tensor:
        if len(self.sizes) == 1:
            return torch.zeros(_BLOCK, dtype=torch.long)
        gen = torch.Generator().manual_seed(self._seed(10_007, block))
        return torch.multinomial(self.probs, _BLOCK, replacement=True, generator=gen)

    def _plan(self) -> Iterator[tuple[int, int]]:
        """(dataset, its micro-batch number) for every global micro-batch from ``start`` on."""
        counts = [0] * len(self.sizes)
        block = 0
        position = 0
        while True:
            choices = self._choices(block).tolist()
            for d in choices:
                if position >= self.start:
                    yield d, counts[d]
                counts[d] += 1
                position += 1
            block += 1

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.world_size
        cache: dict[tuple[int, int], torch.Tensor] = {}
        for d, n in self._plan():
            per_epoch = self.sizes[d] // self.batch_size
            epoch, pos = divmod(n, per_epoch)
            key = (d, epoch)
            if key not in cache:
                cache = {k: v for k, v in cache.items() if k[0] != d}
                cache[key] = self.epoch_order(d, epoch)
            batch = cache[key][pos * self.batch_size : (pos + 1) * self.batch_size] + self.offsets[d]
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
