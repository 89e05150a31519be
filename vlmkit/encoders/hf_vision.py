"""The ``hf_vision`` encoder: a transformers vision tower (CLIP, SigLIP, ViT, DINOv2, any ``AutoModel``
whose forward takes ``pixel_values`` and returns ``hidden_states``).

Exactly one source: ``pretrained`` (a hub id or a local folder) or ``config`` (a config dict with
``model_type``, random initialisation). A composite image-text config (``model_type: clip``,
``siglip``, or any config with a ``vision_config``) stands for its vision tower: only that tower is built
and loaded (e.g. ``CLIPVisionModel`` out of a full CLIP checkpoint; the text weights are not read into
the model, and every vision weight must be present).

Tokens, LLaVA style: the hidden state ``select_layer`` of the encoder (``output_hidden_states``;
``hidden_states[0]`` is the embedding output, ``hidden_states[-1]`` the last layer, before any final
norm or pooling head; default ``-2``, the penultimate layer). ``select_feature: patch`` drops the prefix
tokens, ``cls_patch`` keeps them in front. The prefix-token count comes from the architecture: an
explicit ``num_prefix_tokens``, else the embedding module's ``num_positions - num_patches`` (CLIP: 1
CLS token; SigLIP: 0, it has no CLS), else one blank image through the model at build time (tokens
minus ``(image_size / patch_size) ** 2``).

Preprocessing: the image processor config (``preprocessor_config.json``) next to the weights when
there is one (``crop_size`` when it centre-crops, else ``size``; ``image_mean``, ``image_std``); otherwise
the vision config's ``image_size`` and the family's normalisation (:data:`DEFAULT_NORMALISATION`: CLIP
uses OpenAI's mean (0.4815, 0.4578, 0.4082) / std (0.2686, 0.2613, 0.2758), SigLIP 0.5 / 0.5); other
families need ``mean`` and ``std`` in the recipe. ``image_size``, ``mean`` and ``std`` override all that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import PositiveInt, ValidationInfo, field_validator, model_validator
from torch import nn

from vlmkit.core.meta import architecture
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import BuildContext, EncoderConfig, Preprocess, VisionEncoder
from vlmkit.encoders.probe import blank_image, eval_mode

_FIELD = "model.encoder"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

#: vision ``model_type`` -> (mean, std) used when no image processor config is found
DEFAULT_NORMALISATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "clip_vision_model": _OPENAI_CLIP,
    "siglip_vision_model": _HALF,
    "siglip2_vision_model": _HALF,
}


class HFVisionEncoderConfig(EncoderConfig):
    pretrained: str | None = None
    """A hub id or a local folder with a transformers checkpoint (a vision model, or a composite
    image-text model such as CLIP or SigLIP whose vision tower is taken)."""
    config: dict[str, Any] | None = None
    """Random initialisation from a config dict with ``model_type`` (``AutoConfig.for_model``), e.g.
    ``{model_type: clip_vision_model, hidden_size: 32, ...}`` or ``{model_type: clip, vision_config: {...}}``."""
    select_layer: int = -2
    """Index into ``hidden_states`` (``0``: embeddings, ``-1``: last layer); LLaVA takes ``-2``."""
    select_feature: Literal["patch", "cls_patch"] = "patch"
    """``patch``: patch tokens only (prefix tokens such as CLS dropped); ``cls_patch``: prefix tokens
    followed by the patch tokens (only for towers that have prefix tokens)."""
    num_prefix_tokens: int | None = None
    """How many prefix (CLS, register) tokens precede the patch tokens; default: from the architecture."""
    image_size: PositiveInt | None = None
    """Input size; default: the image processor config's, else the vision config's ``image_size``."""
    mean: tuple[float, float, float] | None = None
    """Per-channel normalisation mean; default: the image processor config's, else the family's."""
    std: tuple[float, float, float] | None = None
    """Per-channel normalisation std; default: the image processor config's, else the family's."""
    interpolate_pos_encoding: bool = False
    """Pass ``interpolate_pos_encoding=True`` to the model (CLIP, SigLIP, ViT ...) so that it takes other
    image sizes than the one it was built for."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype (pixels are cast to it; bf16/fp16 are for GPUs)."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """transformers' attention implementation; default: transformers' choice."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository (only for checkpoints you trust)."""

    @field_validator("config")
    @classmethod
    def _config_source(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return value
        if info.data.get("pretrained") is not None:
            raise ValueError("set either 'pretrained' (hub id or folder) or 'config' (random init), not both")
        if "model_type" not in value:
            raise ValueError("needs 'model_type' (e.g. clip_vision_model, siglip_vision_model, clip)")
        return value

    @field_validator("num_prefix_tokens")
    @classmethod
    def _non_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"must be 0 or more, got {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "HFVisionEncoderConfig":
        if self.pretrained is None and self.config is None:
            raise ValueError("set one source: 'pretrained' (a hub id or local folder) or 'config' (random init)")
        return self


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Loading a vision tower out of a composite checkpoint leaves the text weights unused; transformers
    reports each of them. The report is muted; missing vision weights are checked by the caller."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _vision_part(hf_config: Any) -> tuple[Any, bool]:
    """``(vision config, came from a composite config)``."""
    from transformers import PretrainedConfig

    sub = getattr(hf_config, "vision_config", None)
    if isinstance(sub, PretrainedConfig):
        return sub, True
    return hf_config, False


def _local_folder(ref: str) -> Path | None:
    """``ref`` as a local folder when it is one or is written as a path; ``None`` for a hub id."""
    path = Path(ref).expanduser()
    if path.is_dir() or ref.startswith(("/", "./", "../", "~")) or path.exists():
        return path
    return None


class HFVisionEncoder(VisionEncoder):
    """A transformers vision tower: pixels ``(N, 3, S, S)`` -> hidden state ``select_layer`` as
    ``(N, tokens, width)``."""

    Config = HFVisionEncoderConfig

    @classmethod
    def build(cls, config: HFVisionEncoderConfig, context: BuildContext) -> "HFVisionEncoder":
        """transformers builds and loads ``pretrained`` in one call (``from_pretrained``): on the
        meta device the architecture is built from its config only."""
        return cls(config, meta=context.meta)

    def __init__(self, config: HFVisionEncoderConfig, *, meta: bool = False):
        """``meta``: build on the meta device (under ``torch.device("meta")``), reading no weights."""
        super().__init__(config)
        self.model, self._vision_config = self._load(config, meta)
        vc = self._vision_config
        self._layers = getattr(vc, "num_hidden_layers", None)
        if self._layers is not None and not -(self._layers + 1) <= config.select_layer <= self._layers:
            raise VlmkitError(
                f"{_FIELD}.select_layer: {config.select_layer} is out of range; the model has {self._layers + 1} "
                f"hidden states (0 = embeddings ... {self._layers} = last layer; negative from the end)"
            )
        self._preprocess = self._resolve_preprocess(config, vc)
        built = self._built_size(vc)
        if built is not None and self._preprocess.image_size != built and not config.interpolate_pos_encoding:
            raise VlmkitError(
                f"{_FIELD}.image_size: the model is built for {built} px but preprocessing gives "
                f"{self._preprocess.image_size} px; set {_FIELD}.interpolate_pos_encoding: true or image_size: {built}"
            )
        patch = getattr(vc, "patch_size", None)
        if isinstance(patch, (list, tuple)):
            patch = patch[0] if len(set(patch)) == 1 else None
        self._patch = int(patch) if isinstance(patch, int) else None
        self._width: int | None = None  # set with the prefix tokens below
        self._counts: dict[int, int] = {}
        self._sequence = False
        self._prefix = self._prefix_tokens(config)
        if config.select_feature == "cls_patch" and self._prefix == 0:
            raise VlmkitError(
                f"{_FIELD}.select_feature: 'cls_patch' needs a tower with a CLS (prefix) token, and "
                f"'{vc.model_type}' has none; use 'patch'"
            )

    # ------------------------------------------------------------------ building
    @staticmethod
    def _load(config: HFVisionEncoderConfig, meta: bool) -> tuple[nn.Module, Any]:
        from transformers import AutoConfig, AutoModel
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        dtype = _DTYPES[config.dtype]
        common: dict[str, Any] = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
        if config.attn_implementation is not None:
            common["attn_implementation"] = config.attn_implementation
        if config.config is not None or meta:
            if config.config is not None:
                options = dict(config.config)
            else:
                options = architecture(str(config.pretrained), f"{_FIELD}.pretrained")
            model_type = options.pop("model_type")
            try:
                hf_config = AutoConfig.for_model(model_type, **options)
            except (ValueError, TypeError, KeyError) as exc:
                raise VlmkitError(f"{_FIELD}.config: transformers cannot build a '{model_type}' config: {exc}") from None
            vision, _ = _vision_part(hf_config)
            try:
                model = AutoModel.from_config(vision, **common)
            except (ValueError, TypeError, KeyError) as exc:
                raise VlmkitError(f"{_FIELD}.config: no transformers model for '{vision.model_type}': {exc}") from None
            return model, vision

        ref = str(config.pretrained)
        folder = _local_folder(ref)
        if folder is not None and not folder.is_dir():
            raise VlmkitError(f"{_FIELD}.pretrained: local folder '{folder}' does not exist")
        source = str(folder) if folder is not None else ref
        try:
            hf_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code)
            vision, composite = _vision_part(hf_config)
            if composite:
                if type(vision) not in MODEL_MAPPING:
                    raise VlmkitError(
                        f"{_FIELD}.pretrained: '{ref}' has a '{vision.model_type}' vision config with no transformers "
                        "model class to load it"
                    )
                with _quiet_load_report():
                    model, info = MODEL_MAPPING[type(vision)].from_pretrained(
                        source, config=vision, output_loading_info=True, **common
                    )
            else:
                model, info = AutoModel.from_pretrained(source, config=hf_config, output_loading_info=True, **common)
        except VlmkitError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise VlmkitError(f"{_FIELD}.pretrained: cannot load '{ref}': {exc}") from None
        missing = list(info.get("missing_keys", []))
        if missing:
            raise VlmkitError(
                f"{_FIELD}.pretrained: '{ref}' lacks {len(missing)} weights of its {type(model).__name__} "
                f"(e.g. {missing[:3]}); it would be partly random"
            )
        return model, vision

    @staticmethod
    def _processor_config(config: HFVisionEncoderConfig) -> dict[str, Any] | None:
        """The image processor config stored with the weights, if any (not read when the recipe sets
        image_size, mean and std itself)."""
        if config.pretrained is None or None not in (config.image_size, config.mean, config.std):
            return None
        folder = _local_folder(config.pretrained)
        if folder is not None:
            path = folder / "preprocessor_config.json"
            return json.loads(path.read_text()) if path.is_file() else None
        from transformers.utils import cached_file

        try:  # None when the repository has no such file; an error when it cannot be asked
            found = cached_file(config.pretrained, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        except OSError as exc:
            raise VlmkitError(
                f"{_FIELD}.pretrained: cannot read the image processor config of '{config.pretrained}' ({exc}); "
                f"set {_FIELD}.image_size, mean and std to go without it"
            ) from None
        return json.loads(Path(found).read_text()) if found else None

    @staticmethod
    def _processor_size(proc: dict[str, Any]) -> int | None:
        size = proc.get("crop_size") if proc.get("do_center_crop") and proc.get("crop_size") else proc.get("size")
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            if "height" in size and "width" in size and size["height"] == size["width"]:
                return int(size["height"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"])
        return None

    def _resolve_preprocess(self, config: HFVisionEncoderConfig, vision: Any) -> Preprocess:
        proc = self._processor_config(config) or {}
        size = config.image_size or self._processor_size(proc) or self._built_size(vision)
        if size is None:
            raise VlmkitError(
                f"{_FIELD}.image_size: neither an image processor config nor the '{vision.model_type}' config gives an "
                "image size; set it"
            )
        default = DEFAULT_NORMALISATION.get(vision.model_type)
        mean = config.mean or proc.get("image_mean") or (default[0] if default else None)
        std = config.std or proc.get("image_std") or (default[1] if default else None)
        if mean is None or std is None:
            raise VlmkitError(
                f"{_FIELD}.mean: no image processor config and no known normalisation for '{vision.model_type}' "
                f"(known: {', '.join(sorted(DEFAULT_NORMALISATION))}); set {_FIELD}.mean and {_FIELD}.std"
            )
        return Preprocess(image_size=int(size), mean=tuple(mean), std=tuple(std))

    @staticmethod
    def _built_size(vision: Any) -> int | None:
        size = getattr(vision, "image_size", None)
        if isinstance(size, (list, tuple)):
            size = size[0] if len(set(size)) == 1 else None
        return int(size) if isinstance(size, int) else None

    def _prefix_tokens(self, config: HFVisionEncoderConfig) -> int:
        """Prefix tokens before the patch tokens; also decides whether token counts can be computed
        (``self._sequence``: the hidden states are ``(N, prefix + patches, C)`` with a known patch size)."""
        embedding_prefix = None
        for module in self.model.modules():  # the embedding module: CLIP/SigLIP-style position table
            positions, patches = getattr(module, "num_positions", None), getattr(module, "num_patches", None)
            if isinstance(positions, int) and isinstance(patches, int):
                embedding_prefix = positions - patches
                break
        if embedding_prefix is not None and self._patch is not None:  # isotropic ViT: width = hidden_size
            self._sequence = True
            self._width = int(getattr(self._vision_config, "hidden_size", 0)) or None
            return config.num_prefix_tokens if config.num_prefix_tokens is not None else embedding_prefix
        size = self._preprocess.image_size
        hidden = self._probe(size)
        self._width = int(hidden.shape[1] if hidden.ndim == 4 else hidden.shape[-1])
        if hidden.ndim == 4:  # a feature map: no prefix tokens
            self._sequence = False
            return 0
        self._sequence = self._patch is not None
        if config.num_prefix_tokens is not None:
            return config.num_prefix_tokens
        if self._patch is None:
            raise VlmkitError(
                f"{_FIELD}.num_prefix_tokens: cannot tell how many prefix tokens '{self._vision_config.model_type}' "
                "puts before its patch tokens (no patch_size in its config); set it"
            )
        prefix = int(hidden.shape[1]) - (size // self._patch) ** 2
        if prefix < 0:
            raise VlmkitError(
                f"{_FIELD}.num_prefix_tokens: '{self._vision_config.model_type}' gives {hidden.shape[1]} tokens at "
                f"{size} px, fewer than its {(size // self._patch) ** 2} patches; set it"
            )
        return prefix

    # ------------------------------------------------------------------ running
    def _hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """The raw hidden state ``select_layer``: ``(N, L, C)`` or a feature map ``(N, C, h, w)``."""
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self.config.interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixels.to(device=param.device, dtype=param.dtype), **kwargs)
        states = getattr(out, "hidden_states", None)
        if states is None:
            raise VlmkitError(f"{_FIELD}: {type(self.model).__name__} returns no hidden_states; it cannot serve as hf_vision")
        try:
            return states[self.config.select_layer]
        except IndexError:
            raise VlmkitError(
                f"{_FIELD}.select_layer: {self.config.select_layer} is out of range for {len(states)} hidden states"
            ) from None

    def _probe(self, size: int) -> torch.Tensor:
        """One blank image in eval mode (every module's mode restored)."""
        with eval_mode(self):
            return self._hidden(blank_image(self, size))

    @property
    def width(self) -> int:
        """The config's ``hidden_size``; measured once for models without one."""
        if self._width is None:
            hidden = self._probe(self._preprocess.image_size)
            self._width = int(hidden.shape[1] if hidden.ndim == 4 else hidden.shape[-1])
        return self._width

    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    def num_tokens(self, image_size: int | None = None) -> int:
        """``(image_size / patch_size) ** 2`` patches (+ the prefix tokens with ``cls_patch``); other
        sizes than the model's own need ``interpolate_pos_encoding``."""
        size = image_size or self._preprocess.image_size
        built = self._built_size(self._vision_config)
        if built is not None and size != built and not self.config.interpolate_pos_encoding:
            raise VlmkitError(
                f"{_FIELD}: the model takes {built} px images, not {size}; set {_FIELD}.interpolate_pos_encoding: true"
            )
        if size not in self._counts:
            if self._sequence:
                count = (size // int(self._patch)) ** 2
            else:
                hidden = self._probe(size)
                count = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1] - self._prefix
            self._counts[size] = int(count)
        return self._counts[size] + (self._prefix if self.config.select_feature == "cls_patch" else 0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels (N, 3, S, S)`` normalised per :attr:`preprocess` -> ``(N, tokens, width)``: hidden state
        ``select_layer``, prefix tokens dropped (``patch``) or kept in front (``cls_patch``)."""
        hidden = self._hidden(pixels)
        if hidden.ndim == 4:  # (N, C, h, w) -> (N, h*w, C)
            return hidden.flatten(2).transpose(1, 2)
        if self.config.select_feature == "patch":
            return hidden[:, self._prefix :]
        return hidden
