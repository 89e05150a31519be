"""Projector connectors (LLaVA): ``linear`` and ``mlp`` (``mlpNx_gelu``), applied token by token.

``(N, F * tokens, width_in)`` -> ``(N, F * tokens, width_out)``: one output token per input token
(``pool: none``, the default), or ``pool: mean``: each frame's tokens averaged first, then projected,
``(N, F * tokens, width_in)`` -> ``(N, F, width_out)``: one token per frame. Mean pooling keeps what
tells whole pictures apart (a nearest-neighbour classifier on pooled features is the LCL feature
oracle) and makes prefix sequences short; it drops where things are.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import field_validator
from torch import nn

from vlmkit.core.interfaces import Connector, ConnectorConfig

_MLP_RE = re.compile(r"^mlp([1-9][0-9]*)x_gelu$")


class LinearConfig(ConnectorConfig):
    bias: bool = True
    pool: Literal["none", "mean"] = "none"
    """``none``: one output token per encoder token; ``mean``: one per frame (its tokens averaged)."""


def _pooled(features: torch.Tensor, num_frames: int, pool: str) -> torch.Tensor:
    """``(N, F * T, W)`` -> ``(N, F, W)`` (each frame's T tokens averaged) for ``pool: mean``;
    unchanged for ``none``."""
    if pool == "none":
        return features
    n, length, width = features.shape
    if length % num_frames:
        raise ValueError(f"{length} tokens do not split into {num_frames} frames of equal length")
    return features.reshape(n, num_frames, length // num_frames, width).mean(dim=2)


class MLPConfig(ConnectorConfig):
    projector: str = "mlp2x_gelu"
    """``mlpNx_gelu``: N linear layers with GELU between them (``mlp1x_gelu`` is one linear layer)."""
    bias: bool = True
    pool: Literal["none", "mean"] = "none"
    """``none``: one output token per encoder token; ``mean``: one per frame (its tokens averaged)."""

    @field_validator("projector")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if not _MLP_RE.match(value):
            raise ValueError(f"'{value}' is not of the form mlpNx_gelu (N >= 1), e.g. mlp2x_gelu")
        return value

    @property
    def depth(self) -> int:
        return int(_MLP_RE.match(self.projector).group(1))


class LinearProjector(Connector):
    """One linear layer from encoder width to decoder width (LLaVA-1)."""

    Config = LinearConfig

    def __init__(self, config: LinearConfig):
        super().__init__(config)
        self.proj = nn.Linear(self.width_in, self.width_out, bias=config.bias)

    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        return num_frames if self.config.pool == "mean" else num_tokens_in * num_frames

    def forward(
        self, features: torch.Tensor, num_frames: int = 1, media_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(N, F * tokens, width_in)`` -> ``(N, F * tokens, width_out)``, or ``(N, F, width_out)``
        with ``pool: mean``."""
        return self.proj(_pooled(features, num_frames, self.config.pool))


class MLPProjector(Connector):
    """An MLP projector, mlpNx_gelu (LLaVA-1.5's mlp2x_gelu by default)."""

    Config = MLPConfig

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        layers: list[nn.Module] = [nn.Linear(self.width_in, self.width_out, bias=config.bias)]
        for _ in range(config.depth - 1):
            layers += [nn.GELU(), nn.Linear(self.width_out, self.width_out, bias=config.bias)]
        self.net = nn.Sequential(*layers)

    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        return num_frames if self.config.pool == "mean" else num_tokens_in * num_frames

    def forward(
        self, features: torch.Tensor, num_frames: int = 1, media_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(N, F * tokens, width_in)`` -> ``(N, F * tokens, width_out)``, or ``(N, F, width_out)``
        with ``pool: mean``."""
        return self.net(_pooled(features, num_frames, self.config.pool))
