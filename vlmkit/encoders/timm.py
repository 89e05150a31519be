"""The ``timm`` encoder: any timm image model as a vision encoder.

Tokens come from the last feature map (``forward_features``; a CNN's ``(N, C, h, w)`` map becomes
``h * w`` tokens of width ``C``, a ViT's prefix tokens such as CLS are dropped unless
``drop_prefix_tokens`` is off) or from a chosen stage (``feature_stage``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import PositiveInt, field_validator

from vlmkit.core.errors import VlmkitError, suggest
from vlmkit.core.interfaces import EncoderConfig, Preprocess, VisionEncoder
from vlmkit.core.weights import load_state_dict_file


class TimmEncoderConfig(EncoderConfig):
    model_name: str
    weights: str | None = None
    """A local weights file in timm's key layout (.safetensors, or .pth/.pt read with weights_only);
    none: random initialisation."""
    image_size: PositiveInt | None = None
    """Input size for preprocessing; default: the model's own (``pretrained_cfg``). A ViT built for
    another size also needs ``model_kwargs: {img_size: ...}``."""
    feature_stage: int | None = None
    """Take tokens from this feature stage (index into ``feature_info``, negative from the end)."""
    drop_prefix_tokens: bool = True
    model_kwargs: dict[str, Any] = {}
    """Passed to ``timm.create_model`` (e.g. a tiny ``embed_dim`` and ``depth`` for tests)."""
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("model_name")
    @classmethod
    def _known(cls, value: str) -> str:
        if not timm.is_model(value):
            raise ValueError(f"unknown timm model '{value}'{suggest(value, timm.list_models())} (see timm.list_models())")
        return value


class TimmEncoder(VisionEncoder):
    """Any timm image model; tokens from the last (or a chosen) feature map."""

    Config = TimmEncoderConfig

    def __init__(self, config: TimmEncoderConfig):
        super().__init__(config)
        kwargs = dict(config.model_kwargs)
        self._staged = config.feature_stage is not None
        if self._staged:
            kwargs.update(features_only=True, out_indices=(config.feature_stage,))
        try:
            self.model = timm.create_model(config.model_name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as exc:
            raise VlmkitError(f"model.encoder.model_kwargs: timm model '{config.model_name}' rejected them: {exc}") from None
        if config.weights is not None:
            state = load_state_dict_file(Path(config.weights), "model.encoder.weights")
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith(("head.", "classifier.", "fc."))]
            if missing:
                raise VlmkitError(
                    f"model.encoder.weights: {config.weights} lacks {len(missing)} tensors of '{config.model_name}', "
                    f"e.g. {missing[:3]}"
                )
        data_cfg = timm.data.resolve_model_data_config(self.model)
        size = config.image_size or int(data_cfg["input_size"][-1])
        self._preprocess = Preprocess(
            image_size=size,
            mean=tuple(config.mean or data_cfg["mean"]),
            std=tuple(config.std or data_cfg["std"]),
        )
        if self._staged:
            self._width = int(self.model.feature_info.channels()[-1])
        else:
            self._width = int(self.model.num_features)
        self._tokens: dict[int, int] = {}

    @property
    def width(self) -> int:
        return self._width

    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    def num_tokens(self, image_size: int | None = None) -> int:
        size = image_size or self._preprocess.image_size
        if size not in self._tokens:
            param = next(self.parameters())
            with torch.no_grad():
                out = self.forward(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
            self._tokens[size] = int(out.shape[1])
        return self._tokens[size]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels (N, 3, H, W)`` -> ``(N, tokens, width)``."""
        if self._staged:
            feats = self.model(pixels)[-1]
        else:
            feats = self.model.forward_features(pixels)
        if feats.ndim == 4:  # (N, C, h, w) -> (N, h*w, C)
            return feats.flatten(2).transpose(1, 2)
        if feats.ndim == 3:
            prefix = int(getattr(self.model, "num_prefix_tokens", 0)) if self.config.drop_prefix_tokens else 0
            return feats[:, prefix:]
        raise VlmkitError(f"timm model '{self.config.model_name}' returned features of shape {tuple(feats.shape)}")

