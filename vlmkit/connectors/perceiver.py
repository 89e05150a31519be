"""The ``perceiver`` connector: the Flamingo perceiver resampler.

A fixed set of learned latents reads a variable number of encoder tokens through ``depth`` layers of
cross-attention, so every image (or video clip) becomes ``num_latents`` tokens whatever its size.

Each layer, at width ``d = width_in``::

    m = LayerNorm(media)                      # (N, F * v, d)
    z = LayerNorm(latents)                    # (N, Q, d)
    latents = latents + Out(Attention(q = Wq z, k, v = Wkv [m; z]))   # heads x dim_head
    latents = latents + Linear(mult*d -> d)(GELU(Linear(d -> mult*d)(LayerNorm(latents))))

then a final LayerNorm and, only when ``width_out != width_in``, a ``Linear(width_in, width_out)``
(the OpenFlamingo layout has no projection: the gated cross-attention reads ``d_vis`` directly).

Optional learned embeddings are added to the media tokens before the layers: one per frame
(``max_num_frames``, video) and one per image position within its sample (``max_num_media``).
Frames are merged into the keys of one sequence, as OpenFlamingo does.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Connector, ConnectorConfig, Layers, Size

__all__ = ["PerceiverConfig", "PerceiverResampler"]


class PerceiverConfig(ConnectorConfig):
    """Recipe section ``model.connector`` for ``name: perceiver``. Defaults are Flamingo's."""

    num_latents: Size = 64
    """Learned latents, i.e. output tokens per image (or per clip of frames)."""
    depth: Layers = 6
    """Number of resampler layers (attention + feed-forward each)."""
    heads: Size = 8
    """Attention heads per layer."""
    dim_head: Size = 64
    """Width of each head; the attention works at ``heads * dim_head`` inside."""
    ff_mult: Size = 4
    """Hidden width of the feed-forward block, as a multiple of ``width_in``."""
    latent_init_std: float = Field(1.0, gt=0.0, le=10.0)
    """Standard deviation of the learned latents at initialisation. OpenFlamingo's 1.0 gives latents of
    norm about sqrt(width), large next to the first layers' updates that read the image; a small value
    (e.g. 0.02) makes the output depend on the image from the first step."""
    max_num_frames: Size | None = None
    """Learned frame embeddings for up to this many frames per image (video); none: no frame
    embeddings (frames, if any, are still merged into one sequence)."""
    max_num_media: Size | None = None
    """Learned media-time embeddings for up to this many images per sample, indexed by each image's
    position in its sample; none: no media-time embeddings."""
    max_num_tokens: Size | None = None
    """Learned token-position embeddings for up to this many tokens per frame, added to each encoder
    token by its index (the perceiver is otherwise blind to where a token sits). For encoders whose
    tokens carry no position of their own, such as CNN feature maps; none (OpenFlamingo: CLIP's
    tokens carry theirs): no token-position embeddings."""


class _Attention(nn.Module):
    """Latents attend to ``[media; latents]``: ``(N, M, d), (N, Q, d) -> (N, Q, d)``."""

    def __init__(self, width: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.q = nn.Linear(width, inner, bias=False)
        self.kv = nn.Linear(width, 2 * inner, bias=False)  # keys then values
        self.out = nn.Linear(inner, width, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, heads * dim_head)`` -> ``(N, heads, S, dim_head)``."""
        n, s, _ = x.shape
        return x.reshape(n, s, self.heads, -1).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self._split(self.q(latents))  # (N, h, Q, dh)
        k, v = self.kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)  # (N, M + Q, inner) each
        out = F.scaled_dot_product_attention(q, self._split(k), self._split(v))  # (N, h, Q, dh), scale dh^-0.5
        return self.out(out.transpose(1, 2).flatten(2))  # (N, Q, d)


class _FeedForward(nn.Sequential):
    """LayerNorm -> Linear(d, mult*d, no bias) -> GELU -> Linear(mult*d, d, no bias): ``(..., d) -> (..., d)``."""

    def __init__(self, width: int, mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, mult * width, bias=False)
        self.act = nn.GELU()
        self.down = nn.Linear(mult * width, width, bias=False)


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn = _Attention(width, heads, dim_head)
        self.ff = _FeedForward(width, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(Connector):
    """The Flamingo perceiver resampler (learned latents, optional frame and media-time embeddings).

    ``(N, F * v, width_in)`` -> ``(N, num_latents, width_out)``.
    """

    Config = PerceiverConfig

    def __init__(self, config: PerceiverConfig):
        super().__init__(config)
        d = self.width_in
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * config.latent_init_std)  # (Q, d)
        self.frame_embeddings = (
            nn.Parameter(torch.randn(config.max_num_frames, d)) if config.max_num_frames is not None else None
        )  # (max_num_frames, d)
        self.media_time_embeddings = (
            nn.Parameter(torch.randn(config.max_num_media, d)) if config.max_num_media is not None else None
        )  # (max_num_media, d)
        self.token_embeddings = (
            nn.Parameter(torch.randn(config.max_num_tokens, d)) if config.max_num_tokens is not None else None
        )  # (max_num_tokens, d)
        self.layers = nn.ModuleList(
            _Layer(d, config.heads, config.dim_head, config.ff_mult) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, self.width_out) if self.width_out != d else None

    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        return int(self.config.num_latents)

    def _embed_media(
        self, features: torch.Tensor, num_frames: int, media_positions: torch.Tensor | None
    ) -> torch.Tensor:
        """Add the token-position, frame and media-time embeddings: ``(N, F * v, d)`` -> ``(N, F * v, d)``."""
        n, tokens, d = features.shape
        if self.token_embeddings is not None:
            per_frame = tokens // num_frames
            limit = self.token_embeddings.shape[0]
            if per_frame > limit:
                raise VlmkitError(
                    f"model.connector.max_num_tokens: the encoder gives {per_frame} tokens per frame but the perceiver "
                    f"has token-position embeddings for at most {limit}; raise max_num_tokens to at least {per_frame}"
                )
            frames = features.reshape(n, num_frames, per_frame, d)
            features = (frames + self.token_embeddings[:per_frame]).reshape(n, tokens, d)
        if self.frame_embeddings is not None:
            limit = self.frame_embeddings.shape[0]
            if num_frames > limit:
                raise VlmkitError(
                    f"model.connector.max_num_frames: the batch has {num_frames} frames per image but the perceiver "
                    f"has frame embeddings for at most {limit}; raise max_num_frames to at least {num_frames}"
                )
            frames = features.reshape(n, num_frames, tokens // num_frames, d)
            features = (frames + self.frame_embeddings[:num_frames, None, :]).reshape(n, tokens, d)
        if self.media_time_embeddings is not None:
            if media_positions is None:
                raise ValueError("PerceiverResampler with max_num_media needs media_positions (N,)")
            if media_positions.shape != (n,):
                raise ValueError(f"media_positions must have shape ({n},), got {tuple(media_positions.shape)}")
            limit = self.media_time_embeddings.shape[0]
            if n and not media_positions.is_meta and int(media_positions.max()) >= limit:  # meta: no values to check
                raise VlmkitError(
                    f"model.connector.max_num_media: a sample has {int(media_positions.max()) + 1} images but the "
                    f"perceiver has media-time embeddings for at most {limit}; raise max_num_media to at least "
                    f"{int(media_positions.max()) + 1}"
                )
            features = features + self.media_time_embeddings[media_positions][:, None, :]
        return features

    def forward(
        self, features: torch.Tensor, num_frames: int = 1, media_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``features (N, F * v, width_in)`` (frame-major), ``media_positions (N,)`` long (each image's
        index within its sample; used only with ``max_num_media``) -> ``(N, num_latents, width_out)``."""
        if features.ndim != 3 or features.shape[-1] != self.width_in:
            raise ValueError(f"expected features (N, tokens, {self.width_in}), got {tuple(features.shape)}")
        if num_frames < 1 or features.shape[1] % num_frames:
            raise ValueError(f"{features.shape[1]} tokens do not split into num_frames={num_frames} equal frames")
        media = self._embed_media(features, num_frames, media_positions)  # (N, M, d)
        latents = self.latents.expand(media.shape[0], -1, -1)  # (N, Q, d)
        for layer in self.layers:
            latents = layer(media, latents)
        latents = self.norm(latents)
        return self.proj(latents) if self.proj is not None else latents
