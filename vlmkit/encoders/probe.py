"""Measuring an encoder with one blank image: token counts and widths that depend on the model.

The probe runs in eval mode (a train-mode forward would move BatchNorm running statistics) and puts
every sub-module's mode back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; each sub-module's own train/eval mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def blank_image(module: nn.Module, size: int) -> torch.Tensor:
    """``(1, 3, size, size)`` zeros with the module's dtype and device."""
    param = next(module.parameters())
    return torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)
