"""The ``abstractor`` connector: mPLUG-Owl's visual abstractor with its learned end-of-image vector.

``num_queries`` learned queries read the encoder's tokens through ``num_layers`` cross-attention
layers; the result is projected to the decoder width and one learned end-of-image vector is
appended, so every image (or clip) becomes ``num_queries + 1`` prefix tokens (65 at the defaults)::

    (N, F * tokens, width_in) -> (N, num_queries + 1, width_out)

Computation, with ``H = hidden_size``, ``I = intermediate_size``::

    v = features                              if width_in == H
        Linear(width_in, H)(features)          otherwise             # (N, M, H), M = F * tokens
    x = queries                                                      # (N, Q, H), learned
    for each layer:
        q = LayerNorm_q(x)                                           # (N, Q, H)
        kv = concat(q, LayerNorm_k(v))                               # (N, Q + M, H), queries first
        a = softmax(Wq q (Wk kv)^T / sqrt(H / heads)) Wv kv          # per head, dropout on the weights
        x = q + Out(a)                                               # residual from the NORMALISED queries
        x = x + W2 LayerNorm_I(SiLU(W1 y) * W3 y),  y = LayerNorm_ffn(x)   # SwiGLU with inner LayerNorm
    out = concat(Linear(H, width_out)(x), end_of_image)             # (N, Q + 1, width_out)

Every Linear has a bias, as in the reference (the key bias adds the same score to every key of a
query, cancels in the softmax and so never receives a gradient). There is no final LayerNorm before the output projection and no
self-attention among the queries other than through the ``concat(queries, visual)`` keys.

Sources and decisions (REFERENCE 1.3 gives the queries, layer count, widths, heads, the
``concat(queries, visual)`` keys/values, the LayerNorms on queries and keys, the SwiGLU FFN with an
inner LayerNorm, the output projection and the end-of-image vector). Where it is silent this module
follows the released mPLUG-Owl (v1) code, X-PLUG/mPLUG-Owl ``mplug_owl/modeling_mplug_owl.py`` (the
first release) and ``mPLUG-Owl/mplug_owl/modeling_mplug_owl.py`` (the transformers port):

* Residual stream: the reference's attention block replaces the queries by their LayerNorm
  (``norm1``) and adds the attention output to that normalised tensor, i.e. the residual restarts
  from ``LayerNorm_q(x)`` in every layer. Kept as is (it is what the released weights were trained
  with), although it differs from a textbook pre-norm block.
* Keys and values: one ``Wk`` / ``Wv`` applied to ``concat(LayerNorm_q(x), LayerNorm_k(v))``, the
  queries first, as the reference does. Scores are scaled by ``head_dim ** -0.5``; no attention mask
  (all visual tokens of an image are real).
* Positional embeddings: none. mPLUG-Owl v1 adds no positional information to the visual tokens or
  the queries inside the abstractor (mPLUG-Owl2 later added optional sin-cos embeddings); the visual
  tokens carry whatever position information the encoder put into them. Consequently the output
  does not change when the visual tokens are permuted, and video frames (``num_frames > 1``) are
  simply one longer key sequence.
* ``intermediate_size`` = 2816: the first release builds its SwiGLU from ``4 * H`` with LLaMA's rule
  (``2/3`` of it rounded up to a multiple of 256: 4096 -> 2730 -> 2816) and mPLUG-Owl2's abstractor
  config defaults to 2816. (The transformers port's config class defaults to 4096, which is not the
  size of the first release's weights.)
* LayerNorm epsilons: the reference builds the query, key and pre-FFN LayerNorms without an epsilon
  (torch's default, 1e-5: ``block_layer_norm_eps``) and the SwiGLU's inner LayerNorm with the
  config's ``layer_norm_eps`` = 1e-6. Both are fields here.
* Attention dropout 0.1 (``attention_probs_dropout_prob`` of both v1 configs; mPLUG-Owl2 uses 0).
* The transformers port dropped the first release's extra learned key/value bias tokens
  (``bias_k``/``bias_v``, left uninitialised there); this module follows the port and has none.
* Input projection: the reference has none; its ``LayerNorm_k`` and the shared ``Wk``/``Wv`` work at
  ``H`` and so require the encoder width to equal ``H`` (CLIP ViT-L/14: 1024 = 1024). Here, when
  ``width_in != hidden_size``, one ``Linear(width_in, H)`` (``visual_proj``) maps the visual tokens
  to ``H`` once, before the layers; at ``width_in == H`` there is none and the structure is the
  reference's exactly.
* The end-of-image vector (``vit_eos``) is appended AFTER the output projection, at the decoder
  width, and is the same for every image, as in the reference.
* The learned queries live in this module (the reference keeps ``query_tokens`` in its top-level
  model and passes them in). Initialisation: Linear weights ``normal(0, initializer_range)`` with
  zero biases, LayerNorms 1/0 and the end-of-image vector ``trunc_normal(0, initializer_range)``, as
  the transformers port; the queries ``normal(0, initializer_range)`` rather than the reference's
  zeros, so that the queries (and thus the output tokens) differ from the first step.

Parameter names and their reference counterparts (for converting released weights):
``queries`` = ``query_tokens`` (1, Q, H) squeezed; ``layers.i.norm_queries`` =
``abstractor.encoder.layers.i.crossattention.norm1``; ``norm_visual`` = ``normk``;
``query``/``key``/``value`` = ``attention.query``/``key``/``value``; ``out_proj`` =
``output.out_proj``; ``norm_ffn`` = ``output.norm2``; ``ffn.w1``/``w2``/``w3``/``inner_norm`` =
``output.mlp.w1``/``w2``/``w3``/``ffn_ln``; ``proj`` = ``abstractor.visual_fc``; ``end_of_image`` =
``abstractor.vit_eos`` (1, 1, width_out) squeezed.

At paper scale (defaults, CLIP ViT-L/14 width 1024 in, LLaMA-7B width 4096 out) the connector has
81,473,536 parameters: 6 layers x 12,867,584 + 65,536 queries + 4,198,400 projection + 4,096
end-of-image vector.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveFloat
from torch import nn
from torch.nn import functional as F

from vlmkit.connectors.init import init_bert_style
from vlmkit.connectors.qformer import default_heads
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Connector, ConnectorConfig, Layers, Size

__all__ = ["AbstractorConfig", "VisualAbstractor"]

_WHERE = "model.connector"


class AbstractorConfig(ConnectorConfig):
    """Recipe section ``model.connector`` for ``name: abstractor``. Defaults are mPLUG-Owl's for an
    encoder of width 1024 or more; the sizes left out follow a narrower encoder's width."""

    num_queries: Size = 64
    """Learned queries; each image becomes ``num_queries + 1`` tokens (the queries and the
    end-of-image vector)."""
    num_layers: Layers = 6
    """Cross-attention + SwiGLU layers."""
    hidden_size: Size | None = None
    """Width of the queries and of every layer (``H``). Default (none): derived from the wired
    encoder width, ``min(1024, width_in)``: mPLUG-Owl's 1024 at CLIP ViT-L/14's width (and above it,
    through an input projection), the encoder's own width below that (no input projection: 32 for a
    smoke encoder, 320 for EfficientNet-Lite0), so one recipe line swaps an abstractor in at every
    scale."""
    num_heads: Size | None = None
    """Attention heads; must divide ``hidden_size``. Default (none): heads of width 64 or more, the
    largest divisor of ``hidden_size`` not above ``hidden_size / 64`` and at least 1 (mPLUG-Owl: 16
    at 1024; 5 at 320; 1 below 128)."""
    intermediate_size: Size | None = None
    """Inner width of each SwiGLU feed-forward. Default (none): LLaMA's sizing rule applied to
    ``4 * hidden_size``, two thirds of it rounded up to a multiple of 256 (mPLUG-Owl: 2816 at 1024;
    1024 at 320; 256 at 32)."""

    def sized(self) -> AbstractorConfig:
        """This config with the sizes left out derived from ``width_in`` (which must be set)."""
        if self.width_in is None:
            raise ValueError("VisualAbstractor needs width_in and width_out (the builder sets them)")
        hidden = self.hidden_size if self.hidden_size is not None else min(1024, int(self.width_in))
        heads = self.num_heads if self.num_heads is not None else default_heads(hidden)
        inner = self.intermediate_size
        if inner is None:
            inner = 256 * -(-(8 * hidden // 3) // 256)  # LLaMA: int(2/3 * 4H), up to a multiple of 256
        return self.model_copy(update={"hidden_size": hidden, "num_heads": heads, "intermediate_size": inner})
    layer_norm_eps: PositiveFloat = 1e-6
    """Epsilon of the SwiGLU's inner LayerNorm (mPLUG-Owl's ``layer_norm_eps``)."""
    block_layer_norm_eps: PositiveFloat = 1e-5
    """Epsilon of the LayerNorms on the queries, on the visual tokens (keys) and before the
    feed-forward (the reference builds them with torch's default, 1e-5)."""
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on the attention weights during training (mPLUG-Owl: 0.1)."""
    initializer_range: PositiveFloat = 0.02
    """Standard deviation of the normal initialisation of the queries, every Linear weight and the
    end-of-image vector."""


class _SwiGLU(nn.Module):
    """``W2 LayerNorm(SiLU(W1 x) * W3 x)``: ``(..., H) -> (..., H)`` through width ``I``."""

    def __init__(self, hidden: int, inner: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner)  # gate
        self.w3 = nn.Linear(hidden, inner)  # value
        self.inner_norm = nn.LayerNorm(inner, eps=eps)
        self.w2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.inner_norm(F.silu(self.w1(x)) * self.w3(x)))


class _AbstractorLayer(nn.Module):
    """One abstractor layer: queries ``(N, Q, H)`` read visual tokens ``(N, M, H)`` -> ``(N, Q, H)``."""

    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.norm_queries = nn.LayerNorm(hidden, eps=cfg.block_layer_norm_eps)
        self.norm_visual = nn.LayerNorm(hidden, eps=cfg.block_layer_norm_eps)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.norm_ffn = nn.LayerNorm(hidden, eps=cfg.block_layer_norm_eps)
        self.ffn = _SwiGLU(hidden, cfg.intermediate_size, cfg.layer_norm_eps)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """``(N, S, H)`` -> ``(N, heads, S, H / heads)``."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        q = self.norm_queries(queries)  # (N, Q, H)
        kv = torch.cat((q, self.norm_visual(visual)), dim=1)  # (N, Q + M, H), queries first
        p = self.attention_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(
            self._split(self.query(q)), self._split(self.key(kv)), self._split(self.value(kv)), dropout_p=p
        )  # (N, heads, Q, H / heads), scale (H / heads) ** -0.5
        x = q + self.out_proj(attended.transpose(1, 2).flatten(2))  # residual from the normalised queries
        return x + self.ffn(self.norm_ffn(x))


class VisualAbstractor(Connector):
    """The mPLUG-Owl visual abstractor with its learned end-of-image vector.

    ``(N, F * tokens, width_in)`` -> ``(N, num_queries + 1, width_out)``; the last token is the
    end-of-image vector.
    """

    Config = AbstractorConfig

    def __init__(self, config: AbstractorConfig):
        super().__init__(config)
        derived = [n for n in ("hidden_size", "num_heads") if getattr(config, n) is None]
        config = self.config = config.sized()
        if config.hidden_size % config.num_heads:
            raise VlmkitError(
                f"{_WHERE}.num_heads: {config.num_heads} attention heads do not divide the hidden size "
                f"{config.hidden_size} ({_WHERE}.hidden_size"
                + (f", not set: derived from the encoder width {config.width_in}" if "hidden_size" in derived else "")
                + "); choose a divisor of it (mPLUG-Owl: 16 heads of 64)"
            )
        hidden = config.hidden_size
        self.queries = nn.Parameter(torch.empty(config.num_queries, hidden))  # (Q, H)
        self.visual_proj = nn.Linear(self.width_in, hidden) if self.width_in != hidden else None
        self.layers = nn.ModuleList(_AbstractorLayer(config) for _ in range(config.num_layers))
        self.proj = nn.Linear(hidden, self.width_out)
        self.end_of_image = nn.Parameter(torch.empty(self.width_out))  # (width_out,)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        init_bert_style(self, std)
        nn.init.normal_(self.queries, std=std)
        nn.init.trunc_normal_(self.end_of_image, std=std)

    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        return int(self.config.num_queries) + 1

    def forward(
        self, features: torch.Tensor, num_frames: int = 1, media_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``features (N, F * tokens, width_in)`` (frames merged into one sequence of keys) ->
        ``(N, num_queries + 1, width_out)``. ``media_positions`` is ignored (no media-time
        embeddings)."""
        if features.ndim != 3 or features.shape[-1] != self.width_in:
            raise ValueError(f"expected features (N, tokens, {self.width_in}), got {tuple(features.shape)}")
        if num_frames < 1 or features.shape[1] % num_frames:
            raise ValueError(f"{features.shape[1]} tokens do not split into num_frames={num_frames} equal frames")
        n = features.shape[0]
        visual = self.visual_proj(features) if self.visual_proj is not None else features  # (N, M, H)
        x = self.queries.to(visual.dtype).expand(n, -1, -1)  # (N, Q, H)
        for layer in self.layers:
            x = layer(x, visual)
        out = self.proj(x)  # (N, Q, width_out)
        eos = self.end_of_image.to(out.dtype).expand(n, 1, -1)  # (N, 1, width_out)
        return torch.cat((out, eos), dim=1)
