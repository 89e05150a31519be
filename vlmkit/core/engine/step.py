"""The training step, public: forward, loss, backward and the optimizer step, as the engine takes it.

The engine (:mod:`vlmkit.core.engine.trainer`) owns the orchestration (stages, resume, data order,
checkpoints, evaluation, reports) and calls :class:`TrainStep` once per optimizer step; the
benchmarks and any new training objective call the same object. The loss has one definition,
:func:`answer_loss_sum`: the token-level cross-entropy of the tokens whose label is not
:data:`~vlmkit.core.data.collate.IGNORE` (the collator sets the labels: answers and their end
markers are trained, prompts, padding and image tokens are not), each position predicting the
next token. The step divides the sum by the number of trained tokens in the whole global batch,
so 1 process x batch 8 and 2 processes x batch 4 take the same step whatever the answer lengths.

A new objective keeps the step and changes the loss: subclass :class:`TrainStep` and override
:meth:`TrainStep.loss_sum` (it gets the model and one pass's tensors, labels included, and returns
the summed loss and, in :meth:`TrainStep.normaliser`, what the sum is divided by).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmkit.core.data.collate import IGNORE, split_by_length
from vlmkit.core.errors import VlmkitError

#: the autocast dtype of each stage precision (fp32: no autocast)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy (fp32) of the trained tokens: ``logits (B, L, vocab)``
    from one forward over ``labels (B, L)``; position ``t`` predicts label ``t + 1``; labels equal
    to ``IGNORE`` (-100) count nothing."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`answer_loss_sum` divided by the number of trained tokens (at least 1): the mean loss
    per answer token of one batch."""
    return answer_loss_sum(logits, labels) / max(int((labels[:, 1:] != IGNORE).sum()), 1)


def trained_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool: the positions that predict a trained token (position ``t`` predicts ``t + 1``;
    the last position predicts nothing). What a decoder with ``logits_to_keep`` projects."""
    return F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)


@dataclass
class StepResult:
    #: the global mean loss per trained token of this step
    loss: float
    #: samples this process saw in the step
    samples: int
    #: forward/backward passes this process ran (> micro-batches with length groups)
    passes: int


class TrainStep:
    """One optimizer step over ``grad_accum`` micro-batches, on one or many processes.

    ``accelerator``: accelerate's ``Accelerator`` (reductions, backward, gradient clipping, DDP's
    ``no_sync``); ``precision``: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 takes a gradient
    scaler in :meth:`__call__`); ``max_grad_norm``: clipping of ``trainable`` (None: none);
    ``length_groups``: each micro-batch runs as passes over samples of similar length
    (:func:`~vlmkit.core.data.collate.split_by_length`; the same sums); ``feature_cache``: the
    frozen encoder's features by frame content (the batches then carry the collator's
    ``frame_keys``); None: every frame is encoded.

    The step does not zero the gradients nor step the scheduler: the caller does (after the step,
    as the engine does, ``optimizer.zero_grad(set_to_none=True)``)."""

    def __init__(
        self, accelerator: Any, *, precision: str = "fp32", max_grad_norm: float | None = None,
        length_groups: int = 1, feature_cache: Any = None,
    ):
        self.accelerator = accelerator
        self.dtype = AUTOCAST.get(precision)
        self.max_grad_norm = max_grad_norm
        self.length_groups = length_groups
        self.feature_cache = feature_cache
        self._logits_to_keep: bool | None = None

    # ---------------------------------------------------------------- the objective
    def normaliser(self, micro: list[dict[str, Any]]) -> float:
        """What the summed loss of the step is divided by: the trained tokens of the global batch."""
        acc = self.accelerator
        tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        total = acc.reduce(torch.tensor(float(tokens), device=acc.device), reduction="sum")
        return max(float(total), 1.0)

    def loss_sum(self, wrapped: Any, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> torch.Tensor:
        """The summed loss of one pass: ``tensors`` (the batch's tensors on the device, ``labels``
        included), ``extra`` (non-tensor model inputs: the feature cache and frame keys). Where the
        decoder supports ``logits_to_keep`` only the positions that predict a trained token are
        projected onto the vocabulary (the same value, less work)."""
        device = self.accelerator.device
        model_inputs = {k: v for k, v in tensors.items() if k != "labels"}
        labels = tensors["labels"]
        if self._logits_to_keep is None:
            self._logits_to_keep = bool(self.accelerator.unwrap_model(wrapped).decoder.supports_logits_to_keep)
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
            if self._logits_to_keep:
                # (kept, vocab); no KV cache is built for a training forward
                logits = wrapped(**model_inputs, **extra, logits_to_keep=trained_token_mask(labels), use_cache=False).logits
            else:
                logits = wrapped(**model_inputs, **extra).logits
        if self._logits_to_keep:
            targets = labels[:, 1:]
            return F.cross_entropy(logits.float(), targets[targets != IGNORE], reduction="sum")
        return answer_loss_sum(logits, labels)

    # ---------------------------------------------------------------- the step
    def __call__(
        self, wrapped: Any, micro: list[dict[str, Any]], optimizer: Any, trainable: list[torch.nn.Parameter],
        scaler: Any = None, *, where: str = "the step", advice: str = "",
    ) -> StepResult:
        """Forward, loss and backward over every micro-batch of ``micro`` (collated batches), then
        clipping and ``optimizer.step()``. ``wrapped``: the model as ``accelerator.prepare``
        returned it; ``where``: how an error names this step (a non-finite loss), ``advice``: what
        such an error adds after the samples' ids."""
        acc = self.accelerator
        device = acc.device
        n_tokens = self.normaliser(micro)
        world = acc.num_processes
        loss_sum = torch.zeros((), device=device)
        passes = [part for batch in micro for part in split_by_length(batch, self.length_groups)]
        for i, batch in enumerate(passes):
            tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            extra = {"feature_cache": self.feature_cache, "frame_keys": batch["frame_keys"]} if self.feature_cache is not None else {}
            sync = contextlib.nullcontext() if i == len(passes) - 1 or world == 1 else acc.no_sync(wrapped)
            with sync:
                ce = self.loss_sum(wrapped, tensors, extra)
                if not torch.isfinite(ce):
                    ids = ", ".join(batch["ids"])
                    raise VlmkitError(f"{where}: the loss is {ce.item()} for the batch of samples {ids}{advice}")
                loss = ce / n_tokens * world  # DDP averages gradients over the world
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    acc.backward(loss)
            loss_sum = loss_sum + ce.detach()
        if self.max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            acc.clip_grad_norm_(trainable, self.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total = acc.reduce(loss_sum, reduction="sum")
        return StepResult(float(total) / n_tokens, sum(len(b["ids"]) for b in micro), len(passes))
