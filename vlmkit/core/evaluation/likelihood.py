"""How likely a model finds the trained part of samples: for choosing among candidate answers.

Each sample is a prompt followed by one candidate answer (its trained segments); the score is the
sum of the answer tokens' log-probabilities and their count, so a caller can rank candidates by the
length-normalised log-likelihood (the mean per token, REFERENCE 1.7). Candidates are scored as
whole sequences in batches (the shared prompt is recomputed per candidate, which keeps every
fusion's media handling exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmkit.core.data.collate import IGNORE
from vlmkit.core.interfaces import IMAGE_TOKEN, Sample


def answer_loglikelihoods(
    model: Any, samples: Sequence[Sample], *, batch_size: int = 8, progress: bool = False, desc: str = "scoring",
) -> list[tuple[float, int]]:
    """Per sample: (sum of log p over its trained tokens, how many tokens), in order."""
    collator = model.collator(padding_side="right")
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(samples), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            batch = collator(list(samples[start:start + batch_size]))
            tensors = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "vision_x", "media_mask")}
            with torch.no_grad():
                logits = model(**tensors).logits.float()
            labels = batch["labels"].to(device)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = labels[:, 1:]
            mask = target != IGNORE
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            for total, count in zip(picked.sum(-1).tolist(), mask.sum(-1).tolist()):
                out.append((float(total), int(count)))
    finally:
        model.train(was_training)
    return out


def normalised(score: tuple[float, int]) -> float:
    """Mean log-probability per answer token (``-inf`` for an empty answer)."""
    total, count = score
    return total / count if count else float("-inf")
