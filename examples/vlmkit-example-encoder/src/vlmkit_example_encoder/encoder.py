"""``patch_embed``: a small learnable patch-embedding vision encoder.

Pixels ``(N, 3, H, W)`` are cut into non-overlapping ``patch_size`` squares by a ``Conv2d`` with
kernel = stride = ``patch_size``; each patch becomes one token of ``width`` features, normalised by
a ``LayerNorm``. An image of ``image_size`` gives ``(image_size // patch_size) ** 2`` tokens.

Only the documented contract is used: ``VisionEncoder``, ``EncoderConfig`` and ``Preprocess``
from ``vlmkit``.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt, model_validator
from torch import nn

from vlmkit import EncoderConfig, Preprocess, VisionEncoder


class PatchEmbedConfig(EncoderConfig):
    """The recipe section ``model.encoder`` (without ``name``). ``EncoderConfig`` forbids unknown
    keys, so a misspelt option is an error that names the allowed fields."""

    patch_size: PositiveInt = 8
    width: PositiveInt = 64
    image_size: PositiveInt = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @model_validator(mode="after")
    def _patches_fit(self) -> "PatchEmbedConfig":
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class PatchEmbedEncoder(VisionEncoder):
    """A learnable patch embedding (Conv2d, kernel = stride = patch_size) with LayerNorm."""

    Config = PatchEmbedConfig

    def __init__(self, config: PatchEmbedConfig):
        super().__init__(config)
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        self.norm = nn.LayerNorm(config.width)
        self._preprocess = Preprocess(image_size=config.image_size, mean=config.mean, std=config.std)

    @property
    def width(self) -> int:
        return int(self.config.width)

    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    def num_tokens(self, image_size: int | None = None) -> int:
        size = image_size or self._preprocess.image_size
        return (size // self.config.patch_size) ** 2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels (N, 3, H, W)`` -> ``(N, (H // p) * (W // p), width)``."""
        feats = self.proj(pixels)  # (N, width, H/p, W/p)
        return self.norm(feats.flatten(2).transpose(1, 2))
