"""``pooled_tokens``: a connector that pools the encoder's tokens to a fixed count.

Features ``(N, F * T, width_in)`` (``F`` frames of ``T`` tokens, frame-major) are average-pooled
along the token axis into ``num_queries`` tokens (``adaptive_avg_pool1d``: token ``q`` is the mean
of the input tokens ``floor(q * L / Q) .. ceil((q + 1) * L / Q) - 1``, ``L = F * T``), then mapped
to ``width_out`` by ``Linear -> GELU -> Linear``. Whatever the encoder gives, each image costs the
decoder ``num_queries`` tokens.

Only the documented contract is used, all imported from ``vlmkit``: ``Connector`` and
``ConnectorConfig`` (the builder fills ``width_in`` and ``width_out``), ``forward(features,
num_frames, media_positions)``, ``num_queries()`` (checked by the builder with a dry forward) and
the optional ``lora_target_modules()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from vlmkit import Connector, ConnectorConfig


class PooledTokensConfig(ConnectorConfig):
    """The recipe section ``model.connector`` (without ``name``). ``ConnectorConfig`` forbids
    unknown keys and carries ``width_in`` / ``width_out``, which the builder sets."""

    num_queries: PositiveInt = 8
    """Tokens per image after pooling."""
    hidden: PositiveInt | None = None
    """Width of the MLP's hidden layer (default: ``width_out``)."""


class PooledTokens(Connector):
    """Adaptive average pooling of the tokens to ``num_queries``, then Linear -> GELU -> Linear."""

    Config = PooledTokensConfig

    def __init__(self, config: PooledTokensConfig):
        super().__init__(config)  # refuses a config without width_in / width_out
        hidden = config.hidden or self.width_out
        self.fc1 = nn.Linear(self.width_in, hidden)
        self.fc2 = nn.Linear(hidden, self.width_out)

    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        return int(self.config.num_queries)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, L, width_in)`` -> ``(N, num_queries, width_in)``, means over token windows."""
        return F.adaptive_avg_pool1d(features.transpose(1, 2), self.config.num_queries).transpose(1, 2)

    def forward(
        self, features: torch.Tensor, num_frames: int = 1, media_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``features (N, F * T, width_in)`` -> ``(N, num_queries, width_out)``; frames are pooled
        together, ``media_positions`` is not used."""
        return self.fc2(F.gelu(self.fc1(self.pool(features))))

    def lora_target_modules(self) -> list[str]:
        """What LoRA adapts when a stage tunes this connector with ``lora`` and names no targets."""
        return ["fc1", "fc2"]
