"""The BLIP-2 Q-Former connector (``qformer``): learned queries that read the image through
cross-attention, then BLIP-2's language projection.

``(N, F * tokens, width_in)`` -> ``(N, num_queries, width_out)``; the number of output tokens is
``num_queries`` whatever the number of input tokens or frames (frames are one sequence of keys).

Computation, with ``H = hidden_size`` and every sub-block a BERT post-LayerNorm residual
``x = LayerNorm(x + dropout(sublayer(x)))``::

    x = dropout(LayerNorm(query_tokens))                      # (N, Q, H)
    for i in range(num_layers):
        x = self-attention block(x)                            # queries attend to each other
        if i % cross_attention_frequency == 0:                 # layers 0, 2, ..., 10 at 12 / 2
            x = cross-attention block(x, features)             # keys/values projected from width_in
        x = feed-forward block(x)                              # Linear(H, I), GELU, Linear(I, H)
    out = Linear(H, width_out)(x)                              # (N, Q, width_out)

This is the query branch of BLIP-2's Q-Former (the text branch and its embeddings are used only by
BLIP-2's stage-1 losses and do not exist here), numerically the same as ``transformers``'
``Blip2QFormerModel`` fed ``query_embeds = query_tokens``, followed by ``language_projection``. The
cross-attention placement follows transformers (``layer_idx % cross_attention_frequency == 0``).

At BLIP-2 scale (defaults, EVA ViT-g features of width 1408) the Q-Former with its queries has
105,162,240 parameters; with the projection to OPT-2.7B (2560) 107,130,880, to FlanT5-XL (2048)
106,737,152.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, ValidationError
from torch import nn

from vlmkit.connectors.init import init_bert_style
from vlmkit.core.errors import VlmkitError, suggest
from vlmkit.core.interfaces import Connector, ConnectorConfig, Layers, Size

__all__ = ["QFormer", "QFormerConfig"]

_WHERE = "model.connector"

#: our field -> the Blip2QFormerConfig attribute it corresponds to
_HF_NAMES: dict[str, str] = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "cross_attention_frequency": "cross_attention_frequency",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "initializer_range": "initializer_range",
}

#: Blip2QFormerConfig attributes this Q-Former supports with one value only
_HF_REQUIRED: dict[str, Any] = {"hidden_act": "gelu", "use_qformer_text_input": False}


class QFormerConfig(ConnectorConfig):
    """The ``model.connector`` section of ``name: qformer``. Defaults are BLIP-2's (BERT-base) for
    encoders of width 768 or more; the sizes left out follow a narrower encoder's width. With
    ``hf_config``, the sizes left out are transformers' defaults instead."""

    num_queries: Size = 32
    """Learned query tokens: the output tokens per image (BLIP-2: 32)."""
    hidden_size: Size | None = None
    """Width of the queries and of the transformer. Default (none): derived from the wired encoder
    width, ``min(768, width_in)``: BERT-base's 768 at BLIP-2's and CLIP's widths, the encoder's own
    width below that (32 for a smoke encoder, 320 for EfficientNet-Lite0), so one recipe line swaps a
    Q-Former in at every scale."""
    num_layers: Layers = 12
    """Transformer layers (BERT-base: 12)."""
    num_heads: Size | None = None
    """Attention heads of every self- and cross-attention; must divide ``hidden_size``. Default
    (none): heads of width 64 or more, the largest divisor of ``hidden_size`` not above
    ``hidden_size / 64`` and at least 1 (BERT-base: 12 at 768; 5 at 320; 1 below 128)."""
    intermediate_size: Size | None = None
    """Hidden width of each feed-forward block (GELU). Default (none): ``4 * hidden_size``
    (BERT-base: 3072)."""
    cross_attention_frequency: Size = 2
    """Layer ``i`` cross-attends to the image features when ``i % cross_attention_frequency == 0``
    (2: layers 0, 2, ..., 10 of 12; 1: every layer)."""
    layer_norm_eps: PositiveFloat = 1e-12
    """Epsilon of every LayerNorm (BERT: 1e-12)."""
    hidden_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the query embeddings and on every sub-block's output before its residual."""
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the attention probabilities."""
    initializer_range: PositiveFloat = 0.02
    """Standard deviation of the normal initialisation of the queries and of every Linear weight."""
    hf_config: dict[str, Any] | None = None
    """Keyword arguments of ``transformers.Blip2QFormerConfig``; the hyperparameters above are taken
    from the config it builds (with transformers' defaults for keys it does not give, e.g. dropouts
    0.1). A field above set explicitly is passed on to it and must not contradict a key of
    ``hf_config``. ``encoder_hidden_size``, if given, must equal the encoder width (``width_in``);
    ``hidden_act`` must be ``gelu`` and ``use_qformer_text_input`` false. Text-only keys
    (``vocab_size``, ``max_position_embeddings``, ``pad_token_id``) and transformers' generic config
    keys have no effect, as in ``Blip2QFormerModel``."""


def resolve_config(config: QFormerConfig) -> QFormerConfig:
    """``config`` with ``hf_config`` folded in: every hyperparameter explicit, ``hf_config=None``.

    Raises :class:`VlmkitError` naming the recipe field for conflicts and invalid values."""
    if config.width_in is None or config.width_out is None:
        raise ValueError("QFormer needs width_in and width_out (the builder sets them)")
    values = config.model_dump(exclude={"hf_config"})
    source = {name: f"{_WHERE}.{name}" for name in values}
    if config.hf_config is not None:
        values, source = _from_hf(config)
    else:
        given = values
        values = derived_sizes(values, int(config.width_in))
        for name in ("hidden_size", "num_heads", "intermediate_size"):
            if given.get(name) is None:
                source[name] = f"{_WHERE}.{name} (not set: derived from the encoder width {config.width_in})"
    try:
        resolved = QFormerConfig.model_validate(values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        raise VlmkitError(f"{source.get(name, _WHERE)}: {err['msg']} (got {err.get('input')!r})") from None
    if resolved.hidden_size % resolved.num_heads:
        raise VlmkitError(
            f"{source['num_heads']}: {resolved.num_heads} attention heads do not divide the hidden size "
            f"{resolved.hidden_size} ({source['hidden_size']})"
        )
    return resolved


def default_heads(hidden_size: int) -> int:
    """Heads of width 64 or more: the largest divisor of ``hidden_size`` not above
    ``hidden_size / 64``, at least 1 (768 -> 12, 1024 -> 16, 320 -> 5, 32 -> 1)."""
    most = max(1, hidden_size // 64)
    return next(h for h in range(most, 0, -1) if hidden_size % h == 0)


def derived_sizes(values: dict[str, Any], width_in: int) -> dict[str, Any]:
    """``values`` with the sizes left out (None) derived from the encoder width: ``hidden_size =
    min(768, width_in)``, ``num_heads`` by :func:`default_heads`, ``intermediate_size = 4 * hidden``."""
    values = dict(values)
    if values.get("hidden_size") is None:
        values["hidden_size"] = min(768, width_in)
    if values.get("num_heads") is None:
        values["num_heads"] = default_heads(int(values["hidden_size"]))
    if values.get("intermediate_size") is None:
        values["intermediate_size"] = 4 * int(values["hidden_size"])
    return values


def _from_hf(config: QFormerConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Hyperparameters from ``transformers.Blip2QFormerConfig(**hf_config)`` and, per field, the
    recipe path it came from."""
    from transformers import Blip2QFormerConfig

    hf_config = dict(config.hf_config or {})
    known = set(Blip2QFormerConfig().to_dict())
    for key in hf_config:
        if key not in known:
            raise VlmkitError(
                f"{_WHERE}.hf_config.{key}: not a transformers.Blip2QFormerConfig key{suggest(key, known)}"
            )
    if hf_config.get("model_type", "blip_2_qformer") != "blip_2_qformer":
        raise VlmkitError(
            f"{_WHERE}.hf_config.model_type: '{hf_config['model_type']}' is not a Q-Former config (blip_2_qformer)"
        )
    hf_config.pop("model_type", None)
    width_in = int(config.width_in)
    if "encoder_hidden_size" in hf_config and hf_config["encoder_hidden_size"] != width_in:
        raise VlmkitError(
            f"{_WHERE}.hf_config.encoder_hidden_size: {hf_config['encoder_hidden_size']} is not the width of the "
            f"encoder's features, {width_in} ({_WHERE}.width_in); the cross-attention keys and values project from "
            f"the encoder width: set encoder_hidden_size to {width_in} or remove it"
        )
    explicit = {}
    for name in config.model_fields_set & _HF_NAMES.keys():
        hf_name, value = _HF_NAMES[name], getattr(config, name)
        if value is None:  # left to hf_config (or transformers' default), as if not given
            continue
        if hf_name in hf_config and hf_config[hf_name] != value:
            raise VlmkitError(
                f"{_WHERE}.{name}: {value!r} contradicts {_WHERE}.hf_config.{hf_name} = {hf_config[hf_name]!r}; "
                "give it in one place only"
            )
        explicit[hf_name] = value
    try:
        hf = Blip2QFormerConfig(**(explicit | hf_config | {"encoder_hidden_size": width_in}))
    except (TypeError, ValueError) as exc:
        raise VlmkitError(f"{_WHERE}.hf_config: transformers.Blip2QFormerConfig rejects it: {exc}") from None
    for hf_name, required in _HF_REQUIRED.items():
        if getattr(hf, hf_name) != required:
            raise VlmkitError(
                f"{_WHERE}.hf_config.{hf_name}: {getattr(hf, hf_name)!r} is not supported; the Q-Former connector "
                f"implements {hf_name} = {required!r}"
            )
    values = config.model_dump(include={"num_queries", "width_in", "width_out"})
    source = {name: f"{_WHERE}.{name}" for name in values}
    for name, hf_name in _HF_NAMES.items():
        values[name] = getattr(hf, hf_name)
        from_field = hf_name in explicit and hf_name not in hf_config
        source[name] = f"{_WHERE}.{name}" if from_field else f"{_WHERE}.hf_config.{hf_name}"
    return values, source


class _AttentionBlock(nn.Module):
    """Multi-head attention of ``x (N, L, H)`` over ``context (N, S, kv_width)`` (``x`` itself for
    self-attention) in a post-LayerNorm residual: ``LayerNorm(x + dropout(out(attention)))``."""

    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float, dropout: float, attention_dropout: float):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """``(N, S, H)`` -> ``(N, heads, S, head_dim)``."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x (N, L, H)``, ``context (N, S, kv_width)`` or None -> ``(N, L, H)``."""
        context = x if context is None else context
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        p = self.attention_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (N, heads, L, head_dim)
        attended = attended.transpose(1, 2).flatten(2)  # (N, L, H)
        return self.norm(x + self.dropout(self.out(attended)))


class _FeedForwardBlock(nn.Module):
    """``LayerNorm(x + dropout(fc2(gelu(fc1(x)))))`` on ``(N, L, H)``."""

    def __init__(self, hidden: int, intermediate: int, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, H)`` -> ``(N, L, H)``."""
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class _QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the image features (when
    ``cross_attention``), feed-forward."""

    def __init__(self, c: QFormerConfig, cross_attention: bool):
        super().__init__()
        args = dict(
            heads=c.num_heads, eps=c.layer_norm_eps, dropout=c.hidden_dropout, attention_dropout=c.attention_dropout
        )
        self.self_attn = _AttentionBlock(c.hidden_size, c.hidden_size, **args)
        self.cross_attn = _AttentionBlock(c.hidden_size, int(c.width_in), **args) if cross_attention else None
        self.ffn = _FeedForwardBlock(c.hidden_size, c.intermediate_size, c.layer_norm_eps, c.hidden_dropout)

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``x (N, Q, H)``, ``features (N, S, width_in)`` -> ``(N, Q, H)``."""
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, features)
        return self.ffn(x)


class QFormer(Connector):
    """The BLIP-2 Q-Former (learned queries, cross-attention every other layer) with a projection.

    ``self.config`` is the recipe's section; ``self.hparams`` the hyperparameters in use (with
    ``hf_config`` folded in)."""

    Config = QFormerConfig

    def __init__(self, config: QFormerConfig):
        super().__init__(config)
        c = self.hparams = resolve_config(config)
        self.query_tokens = nn.Parameter(torch.empty(1, c.num_queries, c.hidden_size))  # (1, Q, H)
        self.query_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.query_dropout = nn.Dropout(c.hidden_dropout)
        self.layers = nn.ModuleList(
            _QFormerLayer(c, cross_attention=i % c.cross_attention_frequency == 0) for i in range(c.num_layers)
        )
        self.projection = nn.Linear(c.hidden_size, self.width_out)
        self._init_weights(c.initializer_range)

    def _init_weights(self, std: float) -> None:
        """BERT's initialisation: normal(0, std) queries and Linear weights, zero biases, unit LayerNorms."""
        nn.init.normal_(self.query_tokens, std=std)
        init_bert_style(self, std)

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers that cross-attend to the image features."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.cross_attn is not None)

    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        return self.hparams.num_queries

    def forward(
        self, features: torch.Tensor, num_frames: int = 1, media_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``features (N, F * tokens, width_in)`` -> ``(N, num_queries, width_out)``.

        All ``F * tokens`` feature tokens are keys and values of the cross-attention (one sequence);
        ``media_positions`` is not used. Features are cast to the Q-Former's dtype."""
        if features.dim() != 3 or features.shape[-1] != self.width_in:
            raise ValueError(
                f"QFormer expects features (N, tokens, {self.width_in}), got shape {tuple(features.shape)}"
            )
        x = self.query_tokens.expand(features.shape[0], -1, -1)  # (N, Q, H)
        x = self.query_dropout(self.query_norm(x))
        features = features.to(x.dtype)
        for layer in self.layers:
            x = layer(x, features)
        return self.projection(x)  # (N, Q, width_out)
