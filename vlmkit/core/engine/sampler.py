"""Deterministic, resumable batch order over one or several datasets.

Two ways to mix a stage's datasets (``stages.N.mix``, see :func:`mix_options`):

- by draw (``size``, ``weights``, ``even``): each global micro-batch comes from ONE dataset (as
  Otter draws one data group per step), chosen in proportion to the datasets' sizes, to recipe
  weights, or evenly;
- by fixed counts (``{dataset: count}``): every optimizer step (``grad_accum`` micro-batches) takes
  exactly ``count`` samples of each dataset, as mPLUG-Owl's 128 text-only + 128 multimodal samples
  per step. The step's samples are laid out dataset by dataset in the stage's data order, then cut
  into its micro-batches of ``batch_size``. An epoch is the steps until the dataset that lasts
  longest has been seen once; the others start new passes (new orders) meanwhile.

Within a dataset, every epoch is a permutation drawn from ``(seed, stage, dataset, epoch)`` alone,
cut into micro-batches of ``batch_size`` (or into per-step chunks of its count; an incomplete last
batch is dropped, so every process gets the same number of samples). Process ``r`` of ``W`` takes
the ``r``-th contiguous slice of each micro-batch. The state is one number, the micro-batches
consumed, so a resumed run continues with exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
        counts: list[int] | None = None,
        grad_accum: int = 1,
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
        if counts is not None:
            self._check_counts(counts, sizes, names, batch_size * grad_accum, where)
        else:
            for name, size in zip(names, sizes):
                if size < batch_size:
                    raise VlmkitError(
                        f"{where}.batch_size: {batch_size} is more than the {size} samples of dataset '{name}'; lower it"
                    )
        self.counts = list(counts) if counts is not None else None
        self.grad_accum = grad_accum
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

    @staticmethod
    def _check_counts(counts: list[int], sizes: list[int], names: list[str], step: int, where: str) -> None:
        if len(counts) != len(sizes):
            raise VlmkitError(f"{where}.mix: {len(counts)} per-step counts for {len(sizes)} datasets")
        if sum(counts) != step:
            raise VlmkitError(f"{where}.mix: the per-step counts add up to {sum(counts)} samples, a step takes {step} "
                              "(batch_size * grad_accum)")
        for name, size, count in zip(names, sizes, counts):
            if count < 1 or size < count:
                raise VlmkitError(f"{where}.mix.{name}: {count} samples per step is more than the {size} samples of "
                                  f"dataset '{name}'; lower it")

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in one pass over every dataset (fixed counts: until the longest-lasting
        dataset has been seen once)."""
        if self.counts is not None:
            return self.grad_accum * max(size // count for size, count in zip(self.sizes, self.counts))
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

    def step_indices(self, step: int, cache: dict[tuple[int, int], torch.Tensor] | None = None) -> torch.Tensor:
        """Fixed counts: the global indices of optimizer step ``step`` (``batch_size * grad_accum``
        of them), dataset by dataset in order."""
        cache = {} if cache is None else cache
        parts = []
        for d, count in enumerate(self.counts):
            epoch, pos = divmod(step, self.sizes[d] // count)
            key = (d, epoch)
            if key not in cache:
                for old in [k for k in cache if k[0] == d]:
                    del cache[old]
                cache[key] = self.epoch_order(d, epoch)
            parts.append(cache[key][pos * count : (pos + 1) * count] + self.offsets[d])
        return torch.cat(parts)

    def _iter_counts(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.world_size
        cache: dict[tuple[int, int], torch.Tensor] = {}
        step, part = divmod(self.start, self.grad_accum)
        while True:
            indices = self.step_indices(step, cache)
            for j in range(part, self.grad_accum):
                micro = indices[j * self.batch_size : (j + 1) * self.batch_size]
                yield micro[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
            step, part = step + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.counts is not None:
            yield from self._iter_counts()
            return
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


def mix_options(stage: Any, data_specs: dict[str, Any]) -> dict[str, Any]:
    """The :class:`StageBatchSampler` arguments that mix a stage's datasets as its ``mix`` says."""
    if isinstance(stage.mix, dict):
        return {"counts": [stage.mix[a] for a in stage.data], "grad_accum": stage.grad_accum}
    if stage.mix == "weights":
        return {"weights": [data_specs[a].weight for a in stage.data]}
    if stage.mix == "even":
        return {"weights": [1.0] * len(stage.data)}
    return {}
