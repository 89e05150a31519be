"""Related instructions (``rel_ins_ids``, the in-context examples of the train config): other pairs
about the same media, then the most similar instructions about other media, by the cosine of
instruction embeddings (the mean of a causal LM's last hidden states over the instruction's tokens).

The similarity is a choice in the config (``similarity: embeddings`` or ``none``); nothing falls
back to another measure on its own."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlmkit.core.errors import VlmkitError

__all__ = ["LinkingConfig", "link", "embed"]


class LinkingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    same_media: int = Field(3, ge=0)
    """At most this many other pairs about the same media (in generation order)."""
    similar: int = Field(2, ge=0)
    """At most this many pairs about other media, most similar instruction first."""
    similarity: Literal["embeddings", "none"] = "embeddings"
    """``embeddings``: cosine of instruction embeddings from ``embedding_model``; ``none``: no
    similarity links (then ``similar`` must be 0)."""
    embedding_model: dict[str, Any] = {}
    """The causal LM whose mean hidden state embeds an instruction: ``{gguf_file: ...}``,
    ``{pretrained: ...}`` or ``{config: {...}, tokenizer_type: byte_level}``; empty: the packaged SmolLM2."""
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _explicit(self) -> "LinkingConfig":
        if self.similarity == "none" and self.similar > 0:
            raise ValueError("similar > 0 needs similarity: embeddings (or set similar: 0)")
        unknown = set(self.embedding_model) - {"gguf_file", "pretrained", "config", "tokenizer_type", "dtype"}
        if unknown:
            raise ValueError(f"embedding_model: unknown keys {sorted(unknown)}; allowed: gguf_file, pretrained, "
                             "config, tokenizer_type, dtype")
        return self


def embed(texts: list[str], config: LinkingConfig) -> Any:
    """``(len(texts), width)`` L2-normalised float32 embeddings."""
    import torch

    from vlmkit.llm_backends.transformers import load_causal_lm

    options = dict(config.embedding_model)
    tokenizer_type = options.pop("tokenizer_type", "pretrained")
    dtype = options.pop("dtype", "float32")
    try:
        decoder = load_causal_lm(options, tokenizer_type, dtype)
    except VlmkitError as exc:
        raise VlmkitError(f"linking.embedding_model: {exc}") from None
    tok, model = decoder.tokenizer, decoder.model
    side = tok.padding_side
    tok.padding_side = "right"
    out = []
    try:
        for start in range(0, len(texts), config.batch_size):
            batch = tok(texts[start:start + config.batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False, truncation=True, max_length=128)
            with torch.no_grad():
                hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states[-1]        # (B, L, width)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)           # (B, L, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)                # (B, width)
            out.append(torch.nn.functional.normalize(mean.float(), dim=-1))
    finally:
        tok.padding_side = side
    return torch.cat(out) if out else torch.zeros(0, 1)


def link(ids: list[str], media_keys: list[str], instructions: list[str], config: LinkingConfig) -> dict[str, list[str]]:
    """id -> related ids: same media first (in order), then by similarity (most similar first)."""
    by_media: dict[str, list[int]] = {}
    for i, key in enumerate(media_keys):
        by_media.setdefault(key, []).append(i)
    related: dict[str, list[str]] = {}
    sims = None
    if config.similar > 0 and len(ids) > 1:
        vectors = embed(instructions, config)
        sims = vectors @ vectors.T                                                   # (n, n) cosine
    for i, ins_id in enumerate(ids):
        same = [ids[j] for j in by_media[media_keys[i]] if j != i][:config.same_media]
        similar: list[str] = []
        if sims is not None:
            order = sims[i].argsort(descending=True).tolist()
            similar = [ids[j] for j in order if media_keys[j] != media_keys[i]][:config.similar]
        related[ins_id] = same + similar
    return related
