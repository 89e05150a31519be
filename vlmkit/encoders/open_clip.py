"""The ``open_clip`` encoder: the visual tower of any open_clip model.

Weights, at most one source: ``pretrained`` (an open_clip pretrained tag such as ``openai`` or
``laion2b_s34b_b79k``; open_clip downloads it, or finds it in its cache), ``checkpoint`` (a local
weights file, read safely: safetensors or ``weights_only``), or neither (random initialisation).

Architecture: ``model_name`` (one of ``open_clip.list_models()``), optionally changed by ``model_cfg``:
overrides of open_clip's architecture config (its ``model_cfg``: ``embed_dim``, ``vision_cfg``,
``text_cfg``, ``quick_gelu``, ...), merged key by key into ``model_name``'s config and handed to
``open_clip.create_model`` as its keyword overrides. ``{vision_cfg: {image_size: 32, patch_size: 8,
width: 32, layers: 2, head_width: 16}, text_cfg: {width: 16, heads: 2, layers: 1}}`` builds a tiny tower
for tests or research without registering a config file.

Only the visual tower is kept: the text tower is built by ``create_model`` (a pretrained checkpoint
covers both) and dropped right away, and so are the parts of the visual tower whose output is not used
(the projection to the joint embedding space, a timm tower's head, a ResNet's attention pool).

Tokens per tower kind:

* open_clip ViT: the output of the last transformer block (``visual.transformer``, read with a
  forward hook), then the tower's final LayerNorm ``visual.ln_post`` unless ``ln_post: false``
  (OpenFlamingo and Otter: open_clip 2.16-2.20 returned the tokens before ``ln_post``; open_clip
  3.x after it). ``patch``: the patch tokens, WITHOUT the CLS token; ``select_feature: cls_patch``
  puts the CLS token (same normalisation, unprojected) in front: ``1 + grid**2`` tokens. The
  positional embeddings are fixed: the tower takes only its own image size.
  Towers with an attentional pooler (CoCa) give the pooler's outputs instead of patches (open_clip's
  own ``output_tokens``; ``ln_post: false`` refused).
* timm-backed towers (``vision_cfg.timm_model_name``): the trunk's ``forward_features``; a ViT's prefix
  tokens (CLS, registers: timm's ``num_prefix_tokens``) are dropped for ``patch`` and kept in front for
  ``cls_patch``; a CNN's ``(C, h, w)`` map becomes ``h * w`` tokens.
* ModifiedResNet towers (RN50 ...): the last stage's map, ``h * w`` tokens of width ``C``, no CLS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from pydantic import ValidationInfo, field_validator
from torch import nn

from vlmkit.core.errors import VlmkitError, suggest
from vlmkit.core.interfaces import BuildContext, EncoderConfig, Preprocess, VisionEncoder
from vlmkit.core.weights import load_state_dict_file
from vlmkit.encoders.probe import blank_image, eval_mode

_FIELD = "model.encoder"


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` merged into ``base`` key by key (nested mappings merged, everything else replaced)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class OpenClipEncoderConfig(EncoderConfig):
    model_name: str
    """An open_clip architecture (``open_clip.list_models()``), e.g. ``ViT-L-14``, ``ViT-B-32``."""
    pretrained: str | None = None
    """An open_clip pretrained tag of ``model_name`` (``open_clip.list_pretrained_tags_by_model``);
    open_clip downloads it (or takes it from its cache). Not together with ``checkpoint``."""
    checkpoint: str | None = None
    """A local weights file (.safetensors, or .pth/.pt/.bin read with ``weights_only``): a full open_clip
    state dict (``visual.*`` keys are taken) or the visual tower's own state dict. Not together with
    ``pretrained``; neither: random initialisation."""
    model_cfg: dict[str, Any] = {}
    """Overrides of the architecture config of ``model_name`` (open_clip's ``model_cfg``: ``embed_dim``,
    ``vision_cfg``, ``text_cfg``, ...), merged key by key: ``{vision_cfg: {width: 64}}`` changes only
    the vision width."""
    select_feature: Literal["patch", "cls_patch"] = "patch"
    """``patch``: patch tokens only; ``cls_patch``: the CLS (prefix) token(s) followed by the patch
    tokens, for towers that have a CLS token."""
    ln_post: bool = True
    """open_clip ViTs: the tokens after the tower's final LayerNorm (``visual.ln_post``), as open_clip
    3.x gives them and mPLUG-Owl reads CLIP (``post_layernorm`` on every token). ``false``: the last
    transformer block's output without it, as open_clip 2.16-2.20 gave its tokens to OpenFlamingo
    (and so to Otter, which reads CLIP's last hidden state): the perceiver of an OpenFlamingo or
    Otter checkpoint was trained on these. Other tower kinds: only ``true``."""
    mean: tuple[float, float, float] | None = None
    """Per-channel normalisation mean; default: the model's (or the pretrained tag's) ``preprocess_cfg``."""
    std: tuple[float, float, float] | None = None
    """Per-channel normalisation std; default: the model's (or the pretrained tag's) ``preprocess_cfg``."""

    @field_validator("model_name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        models = open_clip.list_models()
        if value not in models:
            raise ValueError(
                f"unknown open_clip model '{value}'{suggest(value, models)} (see open_clip.list_models())"
            )
        return value

    @field_validator("pretrained")
    @classmethod
    def _known_tag(cls, value: str | None, info: ValidationInfo) -> str | None:
        model_name = info.data.get("model_name")
        if value is None or model_name is None:
            return value
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if value not in tags:
            hint = " (a local file goes in 'checkpoint')" if ("/" in value or "." in value) else ""
            close = suggest(value, tags)
            raise ValueError(
                f"'{value}' is no pretrained tag of open_clip model '{model_name}'{close}{hint}{' ' if close else '; '}"
                f"tags: {', '.join(tags) if tags else '(none: use checkpoint or random init)'}"
            )
        return value

    @field_validator("checkpoint")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("pretrained") is not None:
            raise ValueError("set either 'pretrained' (an open_clip tag) or 'checkpoint' (a local file), not both")
        return value


class OpenClipEncoder(VisionEncoder):
    """The visual tower of an open_clip model: pixels ``(N, 3, S, S)`` -> tokens ``(N, tokens, width)``."""

    Config = OpenClipEncoderConfig

    @classmethod
    def build(cls, config: OpenClipEncoderConfig, context: BuildContext) -> "OpenClipEncoder":
        """open_clip builds and loads ``pretrained`` in one call: on the meta device it builds the
        architecture only."""
        return cls(config, meta=context.meta)

    def __init__(self, config: OpenClipEncoderConfig, *, meta: bool = False):
        """``meta``: build on the meta device (under ``torch.device("meta")``), reading no weights."""
        super().__init__(config)
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        model = self._create(config, meta)
        visual = model.visual
        del model  # the text tower (and logit scale) go with it
        if config.checkpoint is not None and not meta:
            self._load_checkpoint(visual, Path(config.checkpoint))

        pre = open_clip.get_model_preprocess_cfg(visual)
        size = pre.get("size")
        sizes = (size, size) if isinstance(size, int) else tuple(size or ())
        if len(sizes) != 2 or sizes[0] != sizes[1]:
            raise VlmkitError(
                f"{_FIELD}.model_cfg: open_clip model '{config.model_name}' takes images of size {size}; vlmkit "
                "encoders take square images (set vision_cfg.image_size to one number)"
            )
        self._preprocess = Preprocess(
            image_size=int(sizes[0]),
            mean=tuple(config.mean or pre["mean"]),
            std=tuple(config.std or pre["std"]),
        )

        self._kind: str
        self._prefix = 0  # prefix tokens (CLS, registers) in front of the patch tokens of the raw output
        self._analytic_width: int | None = None
        if isinstance(visual, VisionTransformer):
            self._kind = "vit"
            visual.output_tokens = True
            visual.proj = None  # pooled output unprojected: the CLS token, same width as the patches
            attn_pool = getattr(visual, "attn_pool", None) is not None
            if attn_pool or visual.pool_type == "avg" or visual.final_ln_after_pool:
                cls_ok = False
                why = (
                    "its tokens come from an attentional pooler" if attn_pool
                    else "its pooled output is not its CLS token (pool_type avg or final_ln_after_pool)"
                )
            else:
                cls_ok, why = True, ""
            if not attn_pool:
                self._analytic_width = int(visual.transformer.width)
            self._prefix = 0 if attn_pool else 1  # the transformer's output: CLS first (see _last_block)
        elif isinstance(visual, TimmModel):
            self._kind = "timm"
            visual.head = nn.Identity()  # pooling/projection to the joint space: unused
            self._prefix = int(getattr(visual.trunk, "num_prefix_tokens", 0))
            cls_ok = self._prefix > 0
            why = f"its timm trunk '{type(visual.trunk).__name__}' has no prefix (CLS) token"
        elif isinstance(visual, ModifiedResNet):
            self._kind = "resnet"
            visual.attnpool = nn.Identity()  # the attention pool makes the pooled output only: unused
            cls_ok, why = False, "it is a ResNet (a feature map, no CLS token)"
        else:
            raise VlmkitError(
                f"{_FIELD}.model_name: open_clip model '{config.model_name}' has a {type(visual).__name__} visual "
                "tower, from which vlmkit cannot take tokens; supported: open_clip ViTs, timm-backed towers, ResNets"
            )
        if not config.ln_post and (self._kind != "vit" or self._analytic_width is None):
            what = "an attentional pooler" if self._kind == "vit" else f"a {type(visual).__name__} tower"
            raise VlmkitError(
                f"{_FIELD}.ln_post: 'false' (tokens before the final LayerNorm) is available for open_clip ViTs "
                f"only; '{config.model_name}' has {what}; leave ln_post at true"
            )
        if config.select_feature == "cls_patch" and not cls_ok:
            raise VlmkitError(
                f"{_FIELD}.select_feature: 'cls_patch' is not available for open_clip model '{config.model_name}': "
                f"{why}; use 'patch'"
            )
        self.visual = visual
        self._token_counts: dict[int, int] = {}
        self._probed_width: int | None = None

    @staticmethod
    def _create(config: OpenClipEncoderConfig, meta: bool) -> nn.Module:
        base = open_clip.get_model_config(config.model_name) or {}
        overrides: dict[str, Any] = {}
        for key, value in config.model_cfg.items():
            if isinstance(value, dict):  # copied: the recipe's config is never changed
                overrides[key] = _merge(base[key], value) if isinstance(base.get(key), dict) else dict(value)
            else:
                overrides[key] = value
        # A replaced tower config must not start downloading base weights (the defaults of open_clip's
        # tower configs for hf/timm towers); the whole model's weights come from pretrained/checkpoint.
        if "text_cfg" in overrides and "hf_model_name" in overrides["text_cfg"]:
            overrides["text_cfg"].setdefault("hf_model_pretrained", False)
        # A changed image size also goes through open_clip's force_image_size, which resizes the
        # positional embeddings of pretrained weights and sets a timm trunk's input size.
        vision_overrides = config.model_cfg.get("vision_cfg")
        size = vision_overrides.get("image_size") if isinstance(vision_overrides, dict) else None
        try:
            return open_clip.create_model(
                config.model_name,
                pretrained=None if meta else config.pretrained,
                device="meta" if meta else "cpu",
                pretrained_image=False,
                pretrained_text=False,
                weights_only=True,
                force_image_size=size,
                **overrides,
            )
        except RuntimeError as exc:
            if config.pretrained is not None and "download" not in str(exc).lower():
                raise VlmkitError(
                    f"{_FIELD}.pretrained: open_clip weights '{config.pretrained}' do not fit '{config.model_name}' "
                    f"as changed by model_cfg {config.model_cfg}: {exc}"
                ) from None
            if config.pretrained is not None:
                raise VlmkitError(
                    f"{_FIELD}.pretrained: cannot get open_clip weights '{config.pretrained}' for '{config.model_name}' "
                    f"(no network or hub access?): {exc}. Download them elsewhere and give the file as "
                    f"{_FIELD}.checkpoint instead"
                ) from None
            raise VlmkitError(f"{_FIELD}.model_cfg: open_clip could not build '{config.model_name}': {exc}") from None
        except (TypeError, ValueError, KeyError, AssertionError) as exc:
            raise VlmkitError(
                f"{_FIELD}.model_cfg: open_clip could not build '{config.model_name}' with overrides "
                f"{config.model_cfg}: {type(exc).__name__}: {exc}"
            ) from None

    @staticmethod
    def _load_checkpoint(visual: nn.Module, path: Path) -> None:
        field = f"{_FIELD}.checkpoint"
        state = load_state_dict_file(path, field)
        if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
            state = {k.removeprefix("module."): v for k, v in state.items()}
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        try:
            result = visual.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shapes differ
            raise VlmkitError(f"{field}: '{path}' does not fit the visual tower of this model: {exc}") from None
        if result.missing_keys or result.unexpected_keys:
            raise VlmkitError(
                f"{field}: '{path}' does not fit the visual tower of this model: "
                f"{len(result.missing_keys)} tensors missing (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
            )

    # ---------------------------------------------------------------- interface
    @property
    def width(self) -> int:
        if self._analytic_width is not None:
            return self._analytic_width
        if self._probed_width is None:
            self._probe(self._preprocess.image_size)
        return int(self._probed_width)

    @property
    def preprocess(self) -> Preprocess:
        return self._preprocess

    def num_tokens(self, image_size: int | None = None) -> int:
        """Tokens per image. open_clip ViTs: ``grid**2`` (+1 with ``cls_patch``) at their own image size
        only; other towers: measured once per size."""
        size = image_size or self._preprocess.image_size
        if self._kind == "vit" and self._analytic_width is not None:
            own = int(self.visual.image_size[0])
            if size != own:
                raise VlmkitError(
                    f"{_FIELD}: open_clip ViT '{self.config.model_name}' takes only {own} px images (fixed positional "
                    f"embeddings), not {size}; for another size set {_FIELD}.model_cfg: "
                    "{vision_cfg: {image_size: N}}"
                )
            grid = own // int(self.visual.patch_size[0])
            return grid * grid + (1 if self.config.select_feature == "cls_patch" else 0)
        if size not in self._token_counts:
            self._probe(size)
        return self._token_counts[size]

    def _probe(self, size: int) -> None:
        """One blank image through the tower in eval mode (modes restored) to measure tokens and width."""
        with eval_mode(self):
            out = self.forward(blank_image(self, size))
        self._token_counts[size] = int(out.shape[1])
        self._probed_width = int(out.shape[2])

    def _last_block(self, pixels: torch.Tensor) -> torch.Tensor:
        """The output of the tower's last transformer block, ``(N, 1 + grid**2, width)`` with the CLS
        token first: the tower runs as usual and a forward hook on ``visual.transformer`` (open_clip's
        public module) keeps what the transformer returned, before ``ln_post`` and pooling."""
        caught: list[torch.Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            caught.append(output[0] if isinstance(output, tuple) else output)

        handle = self.visual.transformer.register_forward_hook(keep)
        try:
            self.visual(pixels)
        finally:
            handle.remove()
        n = pixels.shape[0]
        if len(caught) != 1 or caught[0].ndim != 3:
            raise VlmkitError(
                f"open_clip {open_clip.__version__}: the visual tower of '{self.config.model_name}' did not run its "
                "'transformer' module once with a (batch, tokens, width) output; this open_clip version changed the "
                f"module structure vlmkit reads ({_FIELD}.ln_post)"
            )
        x = caught[0]
        if x.shape[0] != n and x.shape[1] == n:  # open_clip versions whose transformer works sequence-first
            x = x.transpose(0, 1)
        if x.shape[0] != n or x.shape[2] != self._analytic_width:
            raise VlmkitError(
                f"open_clip {open_clip.__version__}: the transformer of '{self.config.model_name}' returned shape "
                f"{tuple(x.shape)}, expected ({n}, tokens, {self._analytic_width}); this open_clip version changed "
                "the module structure vlmkit reads"
            )
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels (N, 3, S, S)`` normalised per :attr:`preprocess` -> ``(N, tokens, width)``."""
        pixels = pixels.to(next(self.parameters()).dtype)
        cls_patch = self.config.select_feature == "cls_patch"
        if self._kind == "vit" and self._analytic_width is None:  # attentional pooler: its outputs
            pooled, tokens = self.visual(pixels)
            return torch.cat([pooled.unsqueeze(1), tokens], dim=1) if cls_patch else tokens
        if self._kind == "vit":
            seq = self._last_block(pixels)  # (N, 1 + grid**2, width): CLS first, no final LayerNorm
            if self.config.ln_post:
                seq = self.visual.ln_post(seq)
            return seq if cls_patch else seq[:, self._prefix :]
        if self._kind == "timm":
            feats = self.visual.trunk.forward_features(pixels)
        else:  # ModifiedResNet without its attention pool
            v = self.visual
            feats = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(pixels)))))
        if feats.ndim == 4:  # (N, C, h, w) -> (N, h*w, C)
            return feats.flatten(2).transpose(1, 2)
        if feats.ndim == 3:
            return feats if cls_patch else feats[:, self._prefix :]
        raise VlmkitError(f"open_clip model '{self.config.model_name}' returned features of shape {tuple(feats.shape)}")
