"""The ``gated_cross_attention`` fusion (Flamingo, OpenFlamingo, Otter).

Each image stays ONE ``<image>`` marker token in the text. The connector's latents ``(B, T_img, Q, d_vis)``
enter the decoder through gated cross-attention blocks placed before every ``every_n_layers``-th
decoder layer, following OpenFlamingo's convention: layer ``i`` gets a block when
``(i + 1) % every_n_layers == 0`` (with 4 layers and ``every_n_layers: 2``: before layers 1 and 3).

One block, at decoder width ``D`` (text) and media width ``d_vis``::

    a = Out(Attention(q = Wq LayerNorm(x), k, v = Wkv media))     # heads x dim_head, no biases
    x = x + tanh(attn_gate) * a
    x = x + tanh(ff_gate) * Linear(mult*D -> D)(GELU(Linear(D -> mult*D)(LayerNorm(x))))

Both gates start at 0, so at initialisation the decoder computes exactly what it computed before.

Media masking: a text token's image index is the number of ``<image>`` tokens up to and including
it (1 for the first image). With ``only_attend_immediate_media`` a token attends only to the latents
of that image, otherwise to those of every image up to it. Tokens before the first image (index 0)
get a zero attention output (the feed-forward half still applies to them, as in OpenFlamingo), and
padded images (``media_mask`` False) are never attended.

The blocks belong to the fusion (``fusion.blocks``; a stage's ``tune.fusion`` trains exactly them).
They run in forward pre-hooks of the decoder layers, so the decoder's modules and state-dict names
stay unchanged. The fusion stores no media and no per-call state: each call of
:meth:`~GatedCrossAttentionFusion.forward` or :meth:`~GatedCrossAttentionFusion.generate` builds its
own :class:`FusionCall` (the media, the image indices of the chunk being run, the generation step
count, the media keys and values and attention masks computed once per call) and registers, for the
duration of that call only, one pre-hook per selected layer bound to that object (``prepend=True``:
the block runs before any other pre-hook of the layer, so every pre-hook sees the layer's real input);
a ``finally`` removes every hook the call registered, also when the call fails.

Calling the decoder directly, outside the fusion, is an error rather than a silent run without the
images: :meth:`~GatedCrossAttentionFusion.attach` leaves one permanent guard pre-hook on each
selected layer, which refuses the layer's run unless the call's block hook has just run on that very
invocation (the block hook marks the layer's keyword arguments; the guard removes the mark before the
layer sees it). A fusion call made while another is running (from a hook, say) is an error too: the
inner call's block hook runs first and leaves its mark, and the outer call's block hook refuses to
run on top of it. Under gradient checkpointing the decoder layers are recomputed but the blocks (run
by the hooks, outside the checkpointed ``forward``) are not.

Cached generation: transformers' ``generate`` runs the prompt, then one new token per step through
the KV cache. A pre-hook on the decoder's transformers model, registered for the call only and bound
to its :class:`FusionCall`, sees each step's ``input_ids`` chunk.
The fusion counts the tokens itself (:class:`GenerationSteps`): the first step is the whole prompt,
every later step adds one token to each row, so a chunk of ``l`` tokens at step ``k`` either
continues the ``c`` tokens already run (cached: ``c + l = L + k``) or is the whole sequence again
(uncached: ``l = L + k``). The chunk's image indices continue the prompt's ``<image>`` count at
``c``, so generated tokens keep attending to the last image of their row (the bug OpenFlamingo 2.0
fixed and Otter kept: the new tokens lost the image). Nothing is read from the keyword under
which transformers passes its cache (it was ``past_key_values`` and became ``cache`` in 5.24), and
any step that fits neither pattern, or runs uncached when the call asked for a cache, stops the
generation with an error instead of giving the new tokens a wrong image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import IMAGE_TOKEN, Fusion, FusionConfig, LanguageDecoder, Layers, Size

__all__ = [
    "GatedCrossAttentionConfig",
    "GatedCrossAttentionFusion",
    "GatedCrossAttentionBlock",
    "MaskedCrossAttention",
    "IMAGE_TOKEN",
    "GenerationSteps",
    "FusionCall",
]

# the names transformers' models have taken a KV cache under (refused as inputs to forward and generate)
_CACHE_INPUTS = ("past_key_values", "cache")


class GatedCrossAttentionConfig(FusionConfig):
    """Recipe section ``model.fusion`` for ``name: gated_cross_attention``. Defaults are OpenFlamingo's."""

    every_n_layers: Size = 1
    """A block before every n-th decoder layer (OpenFlamingo's ``cross_attn_every_n_layers``: 1 for
    OF-3B, 2 for OF-4B, 4 for OF-9B and Otter)."""
    heads: Size = 8
    """Attention heads of each block's cross-attention."""
    dim_head: Size = 64
    """Width of each head; the cross-attention works at ``heads * dim_head`` inside."""
    ff_mult: Size = 4
    """Hidden width of each block's feed-forward, as a multiple of the decoder width."""
    only_attend_immediate_media: bool = True
    """True: a text token attends only to the latents of the most recent image before it; False: to
    the latents of every image before it."""
    gate_init: float = 0.0
    """Initial value of every ``attn_gate`` and ``ff_gate`` (applied through tanh). Flamingo's 0
    leaves the language model exactly unchanged at the start; a small positive value lets a short
    run (a CPU demo) start using the images sooner."""


# ------------------------------------------------------------------------------------------ blocks
class MaskedCrossAttention(nn.Module):
    """Text attends to media latents under the media mask:
    ``x (B, L, D)``, ``media (B, T_img, Q, d_vis)`` -> ``(B, L, D)``.

    Sub-module names follow OpenFlamingo's ``MaskedCrossAttention`` (``norm, to_q, to_kv, to_out``),
    so its checkpoints map one to one."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int, only_attend_immediate_media: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.only_attend_immediate_media = only_attend_immediate_media
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)  # keys then values
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, heads * dim_head)`` -> ``(B, heads, S, dim_head)``."""
        b, s, _ = x.shape
        return x.reshape(b, s, self.heads, -1).transpose(1, 2)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``media (B, T_img, Q, d_vis)`` -> keys and values ``(B, heads, T_img * Q, dim_head)`` each."""
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        image_index: torch.Tensor,
        media_mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x (B, L, D)`` text, ``media (B, T_img, Q, d_vis)``, ``image_index (B, L)`` long (1-based
        index of each token's image, 0 before the first), ``media_mask (B, T_img)`` bool (True = real
        image; default all real), ``kv``: :meth:`media_kv` of ``media`` if already computed,
        ``masks``: :meth:`attention_masks` if already computed.
        Returns the attention output ``(B, L, D)``, exactly 0 where a token may attend no image."""
        q = self._split(self.to_q(self.norm(x)))  # (B, h, L, dh)
        k, v = kv if kv is not None else self.media_kv(media)  # (B, h, T*Q, dh)
        if masks is None:
            masks = self.attention_masks(image_index, media_mask, media.shape[1], media.shape[2])
        mask, sees = masks
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, dh), scale dh^-0.5
        out = out * sees.to(out.dtype)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, L, D)

    def attention_masks(
        self, image_index: torch.Tensor, media_mask: torch.Tensor | None, T: int, Q: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask ``(B, 1, L, T*Q)`` bool and the rows that see an image ``(B, 1, L, 1)``
        (float 0/1) for tokens with ``image_index (B, L)``; the same for every block of one call,
        so the fusion computes them once."""
        media_time = torch.arange(1, T + 1, device=image_index.device)  # (T,)
        index = image_index.unsqueeze(-1)  # (B, L, 1)
        allowed = index == media_time if self.only_attend_immediate_media else index >= media_time  # (B, L, T)
        if media_mask is not None:
            allowed = allowed & media_mask.unsqueeze(1)
        sees_media = allowed.any(-1)  # (B, L)
        # a row that may attend nothing gets any valid mask (no NaN) and its output is zeroed
        mask = (allowed | ~sees_media.unsqueeze(-1)).repeat_interleave(Q, dim=-1)  # (B, L, T*Q)
        return mask.unsqueeze(1), sees_media[:, None, :, None].float()


class GatedCrossAttentionBlock(nn.Module):
    """One Flamingo block: gated masked cross-attention, then a gated feed-forward.
    ``x (B, L, D)``, ``media (B, T_img, Q, d_vis)`` -> ``(B, L, D)``.

    Parameter names follow OpenFlamingo's ``GatedCrossAttentionBlock`` (``attn.*``, ``attn_gate``,
    ``ff.0-3``, ``ff_gate``; gates of shape ``(1,)``)."""

    def __init__(
        self,
        dim: int,
        dim_visual: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
        gate_init: float = 0.0,
    ):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, heads, dim_head, only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        image_index: torch.Tensor,
        media_mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Arguments as :meth:`MaskedCrossAttention.forward`; returns the new text states ``(B, L, D)``."""
        x = x + self.attn_gate.tanh() * self.attn(x, media, image_index, media_mask, kv, masks)
        return x + self.ff_gate.tanh() * self.ff(x)


# ------------------------------------------------------------------------------------------ fusion
@dataclass
class GenerationSteps:
    """The fusion's own count of the tokens one ``generate`` call has run, per step.

    ``prompt_len`` = ``L``, the prompt's length; ``use_cache``: whether the call asked for a KV
    cache. ``steps`` decoder calls have run so far and ``tokens_run`` tokens of each row have gone
    through the decoder (the cache's length when cached). Step ``k`` sees ``L + k`` tokens per row.
    """

    prompt_len: int
    use_cache: bool
    steps: int = 0
    tokens_run: int = 0

    def advance(self, chunk: int) -> int:
        """Record a decoder call on ``chunk`` tokens per row; returns the position of the chunk's
        first token in the sequence (the number of tokens already in the cache, 0 without one).
        Raises ``RuntimeError`` when the chunk fits neither a cached nor an uncached step."""
        k, length = self.steps, self.prompt_len + self.steps
        if k == 0:
            if chunk != self.prompt_len:
                raise RuntimeError(
                    f"gated_cross_attention: generate's first decoder call ran {chunk} tokens per row for a prompt "
                    f"of {self.prompt_len}; the fusion supports prompts run whole (no chunked prefill)"
                )
            start = 0
        elif chunk == length and not self.use_cache:
            start = 0
        elif chunk == length:
            raise RuntimeError(
                f"gated_cross_attention: generate step {k} ran the whole sequence ({chunk} tokens) again although the "
                "call asked for a KV cache (use_cache=True): transformers did not continue from its cache. "
                "Stopped rather than decode with unknown image positions; report the transformers version"
            )
        elif self.use_cache and chunk == length - self.tokens_run:
            start = self.tokens_run
        else:
            expected = f"{length - self.tokens_run} new tokens after the {self.tokens_run} cached"
            if not self.use_cache:
                expected = f"the whole sequence of {length} tokens (use_cache=False)"
            raise RuntimeError(
                f"gated_cross_attention: generate step {k} ran {chunk} tokens per row; expected {expected}. "
                "Only one new token per row and step is supported (no assisted or speculative decoding)"
            )
        self.steps += 1
        self.tokens_run = start + chunk
        return start


@dataclass
class FusionCall:
    """Everything one :meth:`~GatedCrossAttentionFusion.forward` or
    :meth:`~GatedCrossAttentionFusion.generate` call needs in the decoder; built by the call and
    handed to the hooks it registers (bound with ``functools.partial``), never stored on the fusion.

    ``media (B, T_img, Q, d_vis)``, ``media_mask (B, T_img)``: the batch's images (in generate,
    repeated per row for beams once the expanded batch size is seen). ``image_index (B, l)``: the
    image index of each token of the chunk the decoder is running now. ``masks``: the attention
    masks of that chunk, ``(image_index, mask, sees)``, computed by the first block and shared by
    the others. Generation only: ``prompt_count (B, L)`` = ``<image>`` tokens up to each prompt
    position, ``n_images (B,)`` = real images per row, ``kv`` = block number -> that block's media
    keys and values (computed once per call), ``steps``: the call's token count.
    """

    media: torch.Tensor
    media_mask: torch.Tensor
    image_index: torch.Tensor | None = None
    prompt_count: torch.Tensor | None = None
    n_images: torch.Tensor | None = None
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    steps: GenerationSteps | None = None
    expanded: bool = False
    masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (image_index, mask, sees)

    def expand_to(self, batch: int) -> None:
        """Repeat every per-row tensor for transformers' batch expansion (``num_beams``,
        ``num_return_sequences``: each row repeated consecutively)."""
        rows = self.media.shape[0]
        if self.expanded:
            if batch != rows:
                raise RuntimeError(f"generate changed its batch size from {rows} to {batch} rows between steps")
            return
        if batch % rows:
            raise RuntimeError(f"generate runs {batch} rows for a batch of {rows} prompts (not a multiple)")
        r = batch // rows
        if r > 1:
            self.media = self.media.repeat_interleave(r, dim=0)
            self.media_mask = self.media_mask.repeat_interleave(r, dim=0)
            self.prompt_count = self.prompt_count.repeat_interleave(r, dim=0)
            self.n_images = self.n_images.repeat_interleave(r, dim=0)
        self.expanded = True


# the keyword a call's block hook adds to a layer's arguments and the layer's guard removes again
_BLOCK_RAN = "_vlmkit_gated_cross_attention_block"


def _guard(block_no: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Permanent forward pre-hook of a decoder layer that has a block (registered by ``attach``):
    lets the layer run only right after a fusion call's block hook ran on this same invocation, and
    takes that hook's mark out of the layer's arguments. Holds nothing and reads no fusion state."""
    if kwargs.get(_BLOCK_RAN) != block_no:
        raise RuntimeError(
            "this decoder has gated cross-attention blocks (fusion 'gated_cross_attention'); run it through the "
            "fusion's forward or generate, which supply the images"
        )
    return args, {k: v for k, v in kwargs.items() if k != _BLOCK_RAN}


class GatedCrossAttentionFusion(Fusion):
    """Flamingo gated cross-attention blocks before every n-th decoder layer, tanh gates at 0."""

    Config = GatedCrossAttentionConfig

    def __init__(self, config: GatedCrossAttentionConfig):
        super().__init__(config)
        #: one block per selected decoder layer, in layer order
        self.blocks = nn.ModuleList()
        #: the decoder-layer index each block runs before
        self.layer_indices: list[int] = []
        self.image_token_id: int | None = None
        self._media_width: int | None = None
        # the decoder layers the blocks run before, as found by attach (a plain tuple, not submodules:
        # the decoder owns them); each call hooks its blocks onto these, also once a wrapper (FSDP)
        # has changed what the decoder's layer list holds
        self._layers: tuple[nn.Module, ...] = ()

    # ------------------------------------------------------------------ wiring
    def media_width(self, decoder_width: int, encoder_width: int) -> int:
        """The blocks' keys and values read the encoder width (OpenFlamingo's perceiver keeps it)."""
        return encoder_width

    def placeholder_tokens(self, tokens_per_image: int) -> int:
        """One ``<image>`` token per image, whatever the connector's number of latents."""
        return 1

    def attach(self, decoder: LanguageDecoder, media_width: int) -> None:
        """Add ``<image>``, create one block per selected decoder layer and guard that layer against
        runs outside the fusion (each call hooks the block in for its own duration)."""
        if self.image_token_id is not None:
            raise VlmkitError("fusion 'gated_cross_attention' is already attached to a decoder; build a new one")
        layers = decoder.decoder_layers()  # VlmkitError naming model.decoder.layers_path if not found
        n = self.config.every_n_layers
        indices = [i for i in range(len(layers)) if (i + 1) % n == 0]
        if not indices:
            raise VlmkitError(
                f"model.fusion.every_n_layers: {n} is more than the decoder's {len(layers)} layers, so no "
                f"cross-attention block would be inserted; use at most {len(layers)}"
            )
        self.image_token_id = decoder.add_special_tokens([IMAGE_TOKEN])[IMAGE_TOKEN]
        self._media_width = int(media_width)
        cfg = self.config
        for block_no, i in enumerate(indices):
            self.blocks.append(
                GatedCrossAttentionBlock(
                    decoder.width, media_width, cfg.heads, cfg.dim_head, cfg.ff_mult, cfg.only_attend_immediate_media,
                    gate_init=cfg.gate_init,
                )
            )
            layers[i].register_forward_pre_hook(partial(_guard, block_no), with_kwargs=True)
        self.layer_indices = indices
        self._layers = tuple(layers[i] for i in indices)

    def _check_attached(self) -> None:
        if self.image_token_id is None:
            raise RuntimeError("fusion 'gated_cross_attention' is not attached to a decoder (build_model attaches it)")

    def _check_media(self, is_image: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        """Check the images against the ``<image>`` markers; returns the real images per row ``(B,)``."""
        B = is_image.shape[0]
        if media.dim() != 4 or media.shape[:2] != media_mask.shape or media.shape[0] != B:
            raise VlmkitError(
                f"gated_cross_attention: media must be (B={B}, T_img, Q, d) with media_mask (B, T_img); got media "
                f"{tuple(media.shape)} and media_mask {tuple(media_mask.shape)}"
            )
        if media.shape[-1] != self._media_width:
            raise VlmkitError(
                f"gated_cross_attention: the media have width {media.shape[-1]} but the blocks were built for "
                f"width {self._media_width} (model.connector.width_out)"
            )
        markers = is_image.sum(1)  # (B,)
        n_images = media_mask.sum(1)  # (B,)
        if not torch.equal(markers, n_images):
            b = int((markers != n_images).nonzero()[0])
            raise VlmkitError(
                f"gated_cross_attention: sample {b} of the batch has {int(markers[b])} {IMAGE_TOKEN} tokens but "
                f"{int(n_images[b])} images; each image is one {IMAGE_TOKEN} marker token"
            )
        slots = torch.arange(media_mask.shape[1], device=media_mask.device)
        if not torch.equal(media_mask, slots < n_images.unsqueeze(1)):
            raise VlmkitError(
                "gated_cross_attention: media_mask must list each sample's real images first (True, ..., False)"
            )
        return n_images

    @contextmanager
    def _hooked(self, call: FusionCall, model: nn.Module | None = None) -> Iterator[None]:
        """Hook the blocks into the decoder layers for one call, bound to ``call`` (and, in generate,
        the step counter into ``model``); every hook is removed on exit, whatever happened."""
        handles = []
        try:
            for block_no, layer in enumerate(self._layers):
                handles.append(
                    layer.register_forward_pre_hook(
                        partial(self._run_block, call, block_no), with_kwargs=True, prepend=True
                    )
                )
            if model is not None:
                handles.append(model.register_forward_pre_hook(partial(self._generation_step, call), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run_block(
        self, call: FusionCall, block_no: int, layer: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        """Forward pre-hook of a decoder layer during one call: run block ``block_no`` on the layer's
        hidden states with that call's media, and mark the arguments for the layer's guard."""
        if _BLOCK_RAN in kwargs:  # a later call's hook (registered in front of this one) already ran
            raise RuntimeError("gated_cross_attention: a fusion call was made while another fusion call is running")
        if args:
            hidden = args[0]
        elif "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
        else:
            raise RuntimeError(
                f"gated_cross_attention: decoder layer {type(layer).__name__} got its hidden states neither as its "
                "first positional argument nor as 'hidden_states'"
            )
        index = call.image_index
        if index is None or index.shape != hidden.shape[:2]:
            raise RuntimeError(
                f"gated_cross_attention: the decoder layer runs {tuple(hidden.shape[:2])} tokens but the image "
                f"indices are for {None if index is None else tuple(index.shape)}"
            )
        block = self.blocks[block_no]
        dtype = block.attn_gate.dtype
        media = call.media.to(dtype)
        kv = None
        if call.kv is not None:
            if block_no not in call.kv:
                call.kv[block_no] = block.attn.media_kv(media)
            kv = call.kv[block_no]
        if call.masks is None or call.masks[0] is not index:  # once per call (per step in generate)
            call.masks = (index, *block.attn.attention_masks(index, call.media_mask, media.shape[1], media.shape[2]))
        masks = (call.masks[1], call.masks[2].to(dtype))
        out = block(hidden.to(dtype), media, index, call.media_mask, kv, masks).to(hidden.dtype)
        kwargs = {**kwargs, _BLOCK_RAN: block_no}
        if args:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": out}

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        decoder: LanguageDecoder,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        media_mask: torch.Tensor,
        **decoder_kwargs: Any,
    ) -> Any:
        """``input_ids, attention_mask (B, L)``, ``media (B, T_img, Q, d_vis)``, ``media_mask
        (B, T_img)`` -> the decoder's output (``logits (B, L, vocab)``; the loss is the training
        step's, :mod:`vlmkit.core.engine.step`)."""
        self._check_attached()
        if any(decoder_kwargs.get(key) is not None for key in _CACHE_INPUTS):
            raise VlmkitError(
                "gated_cross_attention: forward runs whole sequences and cannot continue a KV cache "
                "(the images of the cached tokens are unknown); use generate for cached decoding"
            )
        is_image = input_ids == self.image_token_id  # (B, L)
        self._check_media(is_image, media, media_mask)
        embeds = decoder.get_input_embeddings()(input_ids)  # (B, L, D)
        call = FusionCall(media=media, media_mask=media_mask, image_index=is_image.cumsum(1))
        with self._hooked(call):
            return decoder(inputs_embeds=embeds, attention_mask=attention_mask, **decoder_kwargs)

    # ------------------------------------------------------------------ generation
    def _generation_step(self, call: FusionCall, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the transformers model during one :meth:`generate` call: set the
        call's image indices for this step's ``input_ids`` chunk ``(B', l)``.

        The chunk's position in the sequence comes from the call's own token count
        (:meth:`GenerationSteps.advance`), never from transformers' cache arguments. Its indices
        continue the prompt's ``<image>`` count at that position; they are capped at the row's
        number of real images, so a generated ``<image>`` token (which has no image behind it)
        leaves the new tokens on the row's last image. Every generated token thus attends to the
        last image of its row, in every beam and whatever the cache order."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("gated_cross_attention: generate ran a step without input_ids")
        call.expand_to(input_ids.shape[0])
        start = call.steps.advance(input_ids.shape[1])
        prompt_len = call.prompt_count.shape[1]
        if start == 0:
            before = torch.zeros_like(call.n_images)
        elif start <= prompt_len:
            before = call.prompt_count[:, start - 1]  # (B',) images in the tokens before the chunk
        else:
            before = call.n_images  # every prompt image lies before a generated token
        index = before.unsqueeze(1) + (input_ids == self.image_token_id).cumsum(1)  # (B', l)
        call.image_index = torch.minimum(index, call.n_images.unsqueeze(1))

    def generate(
        self,
        decoder: LanguageDecoder,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        media_mask: torch.Tensor,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Continue left-padded prompts ``input_ids (B, L)`` with their media ``(B, T_img, Q, d_vis)``
        through the decoder's ``generate`` (token ids in, KV cache on by default, beam search and
        sampling supported). Returns only the new tokens ``(B * num_return_sequences, new)``."""
        self._check_attached()
        for key in ("inputs_embeds", *_CACHE_INPUTS):
            if generate_kwargs.get(key) is not None:
                raise VlmkitError(f"gated_cross_attention: generate takes token ids only; do not pass {key}")
        if generate_kwargs.get("return_dict_in_generate"):
            raise VlmkitError(
                "gated_cross_attention: generate returns the new tokens; return_dict_in_generate is not supported"
            )
        is_image = input_ids == self.image_token_id  # (B, L)
        n_images = self._check_media(is_image, media, media_mask)
        tok = decoder.tokenizer
        generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", tok.eos_token_id)
        model = decoder.generation_module()
        # the cache decision is made here and passed on, so the step count knows what to expect
        use_cache = generate_kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(getattr(model, "generation_config", None), "use_cache", True))
        generate_kwargs["use_cache"] = bool(use_cache)
        steps = GenerationSteps(prompt_len=input_ids.shape[1], use_cache=bool(use_cache))
        call = FusionCall(
            media=media, media_mask=media_mask, prompt_count=is_image.cumsum(1), n_images=n_images, kv={}, steps=steps
        )
        with self._hooked(call, model):
            out = decoder.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        new = out.shape[1] - input_ids.shape[1]
        if steps.steps != new:
            raise RuntimeError(
                f"gated_cross_attention: generate returned {new} new tokens per row after {steps.steps} decoder calls; "
                "the fusion expects one call per new token, so the image positions of this output cannot be trusted"
            )
        return out[:, input_ids.shape[1] :]
