"""Model composition: a resolved recipe -> encoder, connector, fusion and decoder wired together."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.core.interfaces import IMAGE_TOKEN, BuildContext, Connector, Fusion, LanguageDecoder, VisionEncoder
from vlmkit.core.recipe.loader import ResolvedRecipe

__all__ = ["IMAGE_TOKEN", "VisionLanguageModel", "build_model"]


class VisionLanguageModel(nn.Module):
    """The composed model. ``forward`` takes a collated batch's tensors.

    ``compute_dtype``: None, or the half precision (bf16 / fp16) that some of its parameters were
    loaded in and whose trainable ones a stage upcast to fp32 master weights
    (:func:`vlmkit.core.tuning.upcast_trainable_to_fp32`). The model then holds fp32 and half
    weights side by side, so ``forward`` and ``generate`` run under autocast in that dtype unless
    an autocast is already active (the engine's, from the stage's ``precision``)."""

    #: set by the master-weights step of the tuning; None: no autocast of the model's own
    compute_dtype: torch.dtype | None = None

    def __init__(self, encoder: VisionEncoder, connector: Connector, fusion: Fusion, decoder: LanguageDecoder):
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.fusion = fusion
        self.decoder = decoder
        #: dataset alias -> the chat template that renders it (from the recipe's data section)
        self.templates: dict[str, Any] = {}

    @property
    def component_names(self) -> tuple[str, ...]:
        return ("encoder", "connector", "fusion", "decoder")

    def tokens_per_image(self, num_frames: int = 1) -> int:
        """Connector tokens per image (or clip of ``num_frames`` frames)."""
        return self.connector.num_queries(self.encoder.num_tokens(), num_frames)

    def placeholder_tokens(self, num_frames: int = 1) -> int:
        """``<image>`` tokens the text carries for one image."""
        return self.fusion.placeholder_tokens(self.tokens_per_image(num_frames))

    def collator(self, **options: Any) -> Any:
        """The :class:`~vlmkit.core.data.collate.Collator` for this model's samples: its decoder's
        tokenizer, its encoder's preprocessing and ``<image>`` expanded to its placeholder tokens;
        ``options`` (``max_length``, ``padding_side``, ``prompts``, ``frame_keys``) pass through.
        The one place a collator is made for a model (training, evaluation, benchmarks)."""
        from vlmkit.core.data.collate import Collator

        return Collator(
            tokenizer=self.decoder.tokenizer, preprocess=self.encoder.preprocess, image_token=IMAGE_TOKEN,
            placeholder_tokens=self.placeholder_tokens, **options,
        )

    def encode_media(
        self,
        vision_x: torch.Tensor,
        media_mask: torch.Tensor,
        feature_cache: Any = None,
        frame_keys: list[str] | None = None,
    ) -> torch.Tensor:
        """``vision_x (B, T_img, F, C, H, W)``, ``media_mask (B, T_img)`` -> ``(B, T_img, Q, d)``;
        padded images are not encoded and stay zero.

        ``feature_cache`` (a :class:`~vlmkit.core.engine.features.FeatureCache`) with
        ``frame_keys`` (one key per real frame, in ``vision_x[media_mask]`` order, as the collator
        writes them with ``frame_keys=True``): the encoder's features come from the cache where it
        holds them. Used only while the encoder is frozen and in eval mode; otherwise every frame
        is encoded (and counted as bypassed)."""
        B, T, F = vision_x.shape[:3]
        real = vision_x[media_mask]  # (N, F, C, H, W)
        frames = real.flatten(0, 1)  # (N*F, C, H, W)
        encoder_trains = any(p.requires_grad for p in self.encoder.parameters())
        if feature_cache is not None and frame_keys is not None and not encoder_trains and not self.encoder.training:
            feats = feature_cache.encode(self.encoder, frames, frame_keys)  # (N*F, tokens, w)
        else:
            if feature_cache is not None:
                feature_cache.bypassed += frames.shape[0]
            with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
                feats = self.encoder(frames)  # (N*F, tokens, w)
        feats = feats.reshape(real.shape[0], F * feats.shape[1], feats.shape[2])  # (N, F*tokens, w)
        positions = torch.arange(T, device=media_mask.device).expand(B, T)[media_mask]  # (N,) image index in sample
        tokens = self.connector(feats, num_frames=F, media_positions=positions)  # (N, Q, d)
        media = tokens.new_zeros((B, T, tokens.shape[1], tokens.shape[2]))
        media[media_mask] = tokens
        return media

    def _autocast(self, device: torch.device) -> Any:
        """Autocast in ``compute_dtype`` where the model mixes fp32 master weights with half ones
        and no autocast is active yet; else nothing."""
        dtype = self.compute_dtype
        if dtype is None or torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_x: torch.Tensor,
        media_mask: torch.Tensor,
        feature_cache: Any = None,
        frame_keys: list[str] | None = None,
        **decoder_kwargs: Any,
    ) -> Any:
        """A collated batch's tensors -> the decoder's output (``logits (B, L, vocab)``).
        ``feature_cache``, ``frame_keys``: the frozen encoder's cached features (see
        :meth:`encode_media`); the engine passes them with ``run.cache_features``. The model
        computes no loss: :mod:`vlmkit.core.engine.step` does (one definition), so ``labels`` is
        refused here rather than passed on to the decoder."""
        if "labels" in decoder_kwargs:
            raise TypeError("VisionLanguageModel.forward takes no labels: compute the loss from the logits with "
                            "vlmkit.core.engine.step.answer_loss (the training step's loss)")
        with self._autocast(input_ids.device):
            media = self.encode_media(vision_x, media_mask, feature_cache, frame_keys)
            return self.fusion(self.decoder, input_ids, attention_mask, media, media_mask, **decoder_kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_x: torch.Tensor,
        media_mask: torch.Tensor,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Left-padded prompts ``(B, L)`` with their images -> the new tokens ``(B, new)``."""
        with self._autocast(input_ids.device):
            media = self.encode_media(vision_x, media_mask)
            return self.fusion.generate(self.decoder, input_ids, attention_mask, media, media_mask, **generate_kwargs)


def build_model(resolved: ResolvedRecipe, registry: Any = None, meta: bool = False) -> VisionLanguageModel:
    """Construct every component of ``resolved`` and wire their widths. ``meta``: on the meta
    device, reading and downloading no weights (:mod:`vlmkit.core.meta`), to count parameters:
    every component is built with a :class:`~vlmkit.core.interfaces.BuildContext` that says so,
    under ``torch.device("meta")``, and no ``load_weights`` is called."""
    context = BuildContext(meta=meta)
    if meta:
        with torch.device("meta"):
            return _build_model(resolved, registry, context)
    try:
        return _build_model(resolved, registry, context)
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        # a component that checks its size before allocating says everything itself (``explained``)
        message = str(exc) if getattr(exc, "explained", False) else _allocation_message(resolved, registry, exc)
    raise RecipeError(resolved.source, [message])


#: what torch's allocators say when they cannot serve a request (CPU, CUDA, MPS)
_ALLOCATOR_MESSAGES = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory",
                       "defaultcpuallocator")


def is_allocation_failure(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _ALLOCATOR_MESSAGES)
    )


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:,.0f} {unit}" if value >= 10 else f"{value:.2g} {unit}"
    return f"{n:.0f} bytes"


def _allocation_message(resolved: ResolvedRecipe, registry: Any, exc: BaseException) -> str:
    """The memory the model needs (its weights and buffers, counted on the meta device) and what the
    allocator said."""
    import gc

    gc.collect()  # what the failed build allocated
    said = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    said = said.split("] ", 1)[-1].removeprefix("err == 0. ")  # torch's "[enforce fail at alloc_cpu.cpp:127] err == 0."
    try:
        meta_model = build_model(resolved, registry, meta=True)
        sizes = {
            name: sum(t.numel() * t.element_size() for t in (*getattr(meta_model, name).parameters(),
                                                              *getattr(meta_model, name).buffers()))
            for name in meta_model.component_names
        }
    except Exception:  # noqa: BLE001 - the estimate is a courtesy; the message stands without it
        sizes = {}
    if sizes:
        need = (f"this model needs about {_bytes(sum(sizes.values()))} for its weights alone ("
                + ", ".join(f"{name} {_bytes(size)}" for name, size in sizes.items()) + ")")
    else:
        need = "this model needs more memory than the machine could give"
    return (f"model: building the model ran out of memory: {need}, and the allocator reported: {said}; make the "
            "model smaller (the sizes in the model section) or use a machine with more memory")


def check_connector_output(connector: Connector, encoder: VisionEncoder, name: str) -> None:
    """A dry forward of ``connector`` on one image's zero features ``(1, encoder.num_tokens(),
    encoder.width)``: its output must be ``(1, connector.num_queries(tokens), width_out)``, as the
    collator (placeholder count) and the fusion rely on. Runs under ``no_grad`` in eval mode with
    the random state forked, so building is otherwise unchanged; on the meta device it costs no
    arithmetic. A disagreement is an error naming the connector, at build time, not mid-run."""
    tokens = encoder.num_tokens()
    expected = (1, connector.num_queries(tokens, 1), connector.width_out)
    param = next(iter(connector.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    modes = [(m, m.training) for m in connector.modules()]
    connector.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = connector(torch.zeros(1, tokens, encoder.width, device=device, dtype=dtype), num_frames=1,
                            media_positions=torch.zeros(1, dtype=torch.long, device=device))
    finally:
        for module, mode in modes:
            module.training = mode
    if tuple(out.shape) != expected:
        raise VlmkitError(
            f"model.connector: connector '{name}' ({type(connector).__module__}.{type(connector).__qualname__}) "
            f"returns {tuple(out.shape)} for one image of {tokens} tokens of width {encoder.width}, but its "
            f"num_queries({tokens}) and width_out say {expected}; num_queries must count the tokens forward returns"
        )


def _build_model(resolved: ResolvedRecipe, registry: Any, context: BuildContext) -> VisionLanguageModel:
    if registry is None:
        from vlmkit.core.registry import get_registry

        registry = get_registry()
    torch.manual_seed(resolved.recipe.seed)
    specs = resolved.components

    def construct(kind: str, config: Any) -> Any:
        cls = registry.component_class(kind, specs[kind].name)
        return cls.build(config, context)

    decoder = construct("decoder", specs["decoder"].config)
    encoder = construct("encoder", specs["encoder"].config)
    conn_spec = specs["connector"]
    conn_cfg = conn_spec.config
    enc_name, dec_name, conn_name = specs["encoder"].name, specs["decoder"].name, conn_spec.name
    if getattr(conn_cfg, "width_in", None) is not None and conn_cfg.width_in != encoder.width:
        raise VlmkitError(
            f"model.connector.width_in: connector '{conn_name}' is set to width {conn_cfg.width_in} but encoder "
            f"'{enc_name}' outputs width {encoder.width}; remove width_in to wire it automatically"
        )
    fusion = construct("fusion", specs["fusion"].config)
    update = {"width_in": encoder.width}
    if getattr(conn_cfg, "width_out", None) is None:
        update["width_out"] = fusion.media_width(decoder.width, encoder.width)
    conn_cfg = conn_cfg.model_copy(update=update)
    connector = construct("connector", conn_cfg)
    check_connector_output(connector, encoder, conn_name)
    try:
        fusion.attach(decoder, connector.width_out)
    except VlmkitError as exc:
        raise VlmkitError(f"{exc} (connector '{conn_name}', decoder '{dec_name}')") from None
    model = VisionLanguageModel(encoder, connector, fusion, decoder)
    # the datasets' chat templates, and the special tokens they write (after the fusion's <image>)
    for alias, spec in getattr(resolved, "templates", {}).items():
        template = registry.component_class("template", spec.name)(spec.config)
        decoder.add_special_tokens(list(template.special_tokens))
        model.templates[alias] = template
    return model
