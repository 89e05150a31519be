"""AdamW with parameter groups and the learning-rate schedule of a stage."""

from __future__ import annotations

import math
from typing import Any

import torch

from vlmkit.core.recipe.schema import StageSpec
from vlmkit.core.tuning import embedding_tables, new_token_rows

#: parameter-name fragments that never get weight decay (besides every 1-d parameter, the
#: embedding tables and the added tokens' rows): norms, biases, the tanh gates of cross-attention,
#: embeddings
NO_DECAY_HINTS = ("norm", "bias", "gate", "embed")


def param_groups(model: Any, stage: StageSpec) -> list[dict[str, Any]]:
    """One group per (component, decay or not) with the component's learning rate
    (``lr_per_component`` or the stage's ``lr``); weight decay only where it belongs."""
    groups = []
    tables = {id(t) for t in embedding_tables(model.decoder)}
    rows = new_token_rows(model.decoder)
    if rows is not None:
        tables |= {id(p) for params in rows.tables().values() for p in params}
    for comp in model.component_names:
        lr = stage.lr_per_component.get(comp, stage.lr)
        decay, no_decay = [], []
        for name, param in getattr(model, comp).named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim < 2 or id(param) in tables or any(h in name.lower() for h in NO_DECAY_HINTS):
                no_decay.append(param)
            else:
                decay.append(param)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": stage.optimizer.weight_decay, "name": comp})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{comp}.no_decay"})
    return groups


def total_steps(stage: StageSpec, batches_per_epoch: int) -> int:
    """Optimizer steps of a stage: ``max_steps``, or ``epochs`` over the data in global batches."""
    if stage.max_steps is not None:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * batches_per_epoch / stage.grad_accum))


def build_optimizer(groups: list[dict[str, Any]], stage: StageSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=stage.optimizer.betas, eps=stage.optimizer.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageSpec, total: int) -> Any:
    from transformers import get_scheduler

    warmup = stage.warmup_steps or int(stage.warmup_ratio * total)
    return get_scheduler(stage.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
