"""Import OpenFlamingo checkpoints into a vlmkit model (encoder ``open_clip``, connector ``perceiver``,
fusion ``gated_cross_attention``, decoder ``hf_causal_lm``).

OpenFlamingo's ``Flamingo`` module holds ``vision_encoder`` (an open_clip visual tower),
``perceiver`` (the resampler) and ``lang_encoder`` (a transformers causal LM whose decoder layers
were wrapped in ``FlamingoLayer(gated_cross_attn_layer, decoder_layer)``). Key layout, OpenFlamingo
-> vlmkit (``P`` is the decoder-layer path, ``model.layers`` for Llama, ``transformer.blocks`` for MPT;
``i`` a decoder-layer index, ``b`` the fusion block placed before layer ``i``)::

    vision_encoder.X                                  -> encoder.visual.X
    perceiver.latents                                 -> connector.latents
    perceiver.frame_embs                              -> connector.frame_embeddings
    perceiver.media_time_embs  (M, 1, d)              -> connector.media_time_embeddings  (M, d)
    perceiver.layers.N.0.{norm_media,norm_latents}.*  -> connector.layers.N.attn.{norm_media,norm_latents}.*
    perceiver.layers.N.0.{to_q,to_kv,to_out}.weight   -> connector.layers.N.attn.{q,kv,out}.weight
    perceiver.layers.N.1.{0,1,3}.*                    -> connector.layers.N.ff.{norm,up,down}.*
    perceiver.norm.*                                  -> connector.norm.*
    lang_encoder.P.i.gated_cross_attn_layer.R         -> fusion.blocks.b.R   (same R: attn.*, attn_gate, ff.*, ff_gate)
    lang_encoder.gated_cross_attn_layers.i.R          -> fusion.blocks.b.R   (the same tensors, a second name)
    lang_encoder.P.i.decoder_layer.R                  -> decoder.model.P.i.R
    lang_encoder.old_decoder_blocks.i.R               -> decoder.model.P.i.R (the same tensors, a second name)
    lang_encoder.R  (embeddings, final norm, lm_head) -> decoder.model.R

Ignored keys (see :data:`IGNORED`): ``vision_encoder.proj`` (open_clip's projection of the pooled
output into CLIP's joint space; Flamingo reads the unprojected patch tokens) and rotary
``inv_freq`` buffers (derived from the config; older transformers saved them).

A released OpenFlamingo ``checkpoint.pt`` holds only what OpenFlamingo trains (perceiver,
cross-attention blocks, the LM's input embeddings): build the vlmkit model with the same vision
tower and language model weights, then import the checkpoint on top.

Vision tokens: OpenFlamingo was trained with open_clip 2.16-2.20, whose ViT returned its patch
tokens WITHOUT the final LayerNorm (``ln_post`` normalised only the pooled output). Its perceiver
expects those: give the vlmkit encoder ``open_clip`` the option ``ln_post: false``. With the
encoder's default (``ln_post: true``, the tokens open_clip 3.x returns) the imported perceiver sees
rescaled inputs; :func:`import_openflamingo` warns (:class:`TokenNormWarning`).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vlmkit.core.errors import VlmkitError

__all__ = ["IGNORED", "TokenNormWarning", "map_openflamingo_state_dict", "import_openflamingo"]


class TokenNormWarning(UserWarning):
    """An OpenFlamingo checkpoint goes into a model whose open_clip encoder normalises its tokens
    with ``ln_post``, which OpenFlamingo's perceiver never saw."""


#: OpenFlamingo keys that have no place in a vlmkit model: (pattern, reason)
IGNORED: list[tuple[str, str]] = [
    (
        r"^vision_encoder\.proj$",
        "open_clip's projection of the pooled output into CLIP's joint embedding space; Flamingo reads the "
        "unprojected patch tokens and vlmkit's open_clip encoder drops the projection",
    ),
    (
        r"^lang_encoder\..*rotary_emb\.inv_freq$",
        "rotary-embedding frequencies are computed from the decoder config (older transformers saved them)",
    ),
]

# perceiver.<OF name> -> connector.<vlmkit name> (also used by the perceiver's parity test)
PERCEIVER_KEYS = [
    (r"^latents$", "latents"),
    (r"^frame_embs$", "frame_embeddings"),
    (r"^media_time_embs$", "media_time_embeddings"),
    (r"^layers\.(\d+)\.0\.(norm_media|norm_latents)\.(weight|bias)$", r"layers.\1.attn.\2.\3"),
    (r"^layers\.(\d+)\.0\.to_q\.weight$", r"layers.\1.attn.q.weight"),
    (r"^layers\.(\d+)\.0\.to_kv\.weight$", r"layers.\1.attn.kv.weight"),
    (r"^layers\.(\d+)\.0\.to_out\.weight$", r"layers.\1.attn.out.weight"),
    (r"^layers\.(\d+)\.1\.0\.(weight|bias)$", r"layers.\1.ff.norm.\2"),
    (r"^layers\.(\d+)\.1\.1\.weight$", r"layers.\1.ff.up.weight"),
    (r"^layers\.(\d+)\.1\.3\.weight$", r"layers.\1.ff.down.weight"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
]

_WRAPPED = re.compile(r"^lang_encoder\.(?P<path>.+)\.(?P<i>\d+)\.(?P<part>gated_cross_attn_layer|decoder_layer)\.(?P<rest>.+)$")
_XATTN_LIST = re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_OLD_BLOCKS = re.compile(r"^lang_encoder\.old_decoder_blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def ignored_reason(key: str) -> str | None:
    """Why the OpenFlamingo key ``key`` is not imported, or None when it is imported."""
    for pattern, reason in IGNORED:
        if re.match(pattern, key):
            return reason
    return None


def _layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer list inside ``model.decoder.model`` (e.g. ``model.layers``)."""
    layers = model.decoder.decoder_layers()
    inner = getattr(model.decoder, "model", None)
    if inner is None:
        raise VlmkitError("OpenFlamingo import needs a transformers decoder (decoder 'hf_causal_lm')")
    for name, module in inner.named_modules():
        if module is layers:
            return name
    raise VlmkitError("OpenFlamingo import: the decoder's layer list is not inside its transformers model")


def _check_model(model: nn.Module) -> None:
    missing = [n for n in ("encoder", "connector", "fusion", "decoder") if not hasattr(model, n)]
    if missing:
        raise VlmkitError(f"OpenFlamingo import needs a composed VisionLanguageModel; {missing} missing")
    if not hasattr(model.fusion, "layer_indices") or not hasattr(model.fusion, "blocks"):
        raise VlmkitError(
            f"OpenFlamingo import needs fusion 'gated_cross_attention'; this model has {type(model.fusion).__name__}"
        )


def _target(key: str, layers_path: str, layer_indices: list[int]) -> str | None:
    """The vlmkit name of OpenFlamingo key ``key`` (``module.`` already stripped), None if unknown."""
    if key.startswith("perceiver."):
        sub = key.removeprefix("perceiver.")
        for pattern, repl in PERCEIVER_KEYS:
            if re.match(pattern, sub):
                return "connector." + re.sub(pattern, repl, sub)
        return None
    if key.startswith("vision_encoder."):
        return "encoder.visual." + key.removeprefix("vision_encoder.")
    if not key.startswith("lang_encoder."):
        return None

    def block(i: int, rest: str) -> str:
        if i not in layer_indices:
            raise VlmkitError(
                f"OpenFlamingo key '{key}': a cross-attention block before decoder layer {i}, but this model's "
                f"fusion has blocks before layers {layer_indices}; set model.fusion.every_n_layers to the "
                "checkpoint's cross_attn_every_n_layers"
            )
        return f"fusion.blocks.{layer_indices.index(i)}.{rest}"

    if m := _XATTN_LIST.match(key):
        return block(int(m["i"]), m["rest"])
    if m := _OLD_BLOCKS.match(key):
        return f"decoder.model.{layers_path}.{m['i']}.{m['rest']}"
    if m := _WRAPPED.match(key):
        if m["path"] != layers_path:
            raise VlmkitError(
                f"OpenFlamingo key '{key}': decoder layers at '{m['path']}', but this model's decoder has them at "
                f"'{layers_path}' (a different language-model family?)"
            )
        if m["part"] == "gated_cross_attn_layer":
            return block(int(m["i"]), m["rest"])
        return f"decoder.model.{layers_path}.{m['i']}.{m['rest']}"
    return "decoder.model." + key.removeprefix("lang_encoder.")


#: OpenFlamingo's name of the pad token it adds when the tokenizer has none
OF_PAD = "<PAD>"


def _embedding_keys(model: nn.Module) -> set[str]:
    """The vlmkit state-dict names of the decoder's token-embedding tables (input, untied output)."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = {names[id(model.decoder.get_input_embeddings().weight)]}
    out = model.decoder.get_output_embeddings()
    if out is not None and id(out.weight) in names:
        keys.add(names[id(out.weight)])
    return keys


def _move_token_rows(key: str, value: torch.Tensor, current: torch.Tensor, model: nn.Module,
                     added_tokens: Sequence[str]) -> torch.Tensor:
    """An OpenFlamingo embedding table (base vocabulary, then ``added_tokens`` in OpenFlamingo's
    order) laid out in vlmkit's token ids: base rows in place, each added token's row moved to
    vlmkit's id of the same token; vlmkit tokens OpenFlamingo lacks keep their rows."""
    base = value.shape[0] - len(added_tokens)
    if value.dim() != 2 or value.shape[1] != current.shape[1] or base <= 0 or current.shape[0] < base + 1:
        raise VlmkitError(
            f"OpenFlamingo key '{key}' has shape {tuple(value.shape)}, which does not fit this model's {tuple(current.shape)} "
            f"with {len(added_tokens)} added tokens ({', '.join(added_tokens)})"
        )
    tok = model.decoder.tokenizer
    out = current.detach().clone()
    out[:base] = value[:base]
    for j, token in enumerate(added_tokens):
        token_id = tok.pad_token_id if token == OF_PAD and token not in tok.get_vocab() else tok.convert_tokens_to_ids(token)
        if token_id is None or token_id == tok.unk_token_id or token_id < base:
            raise VlmkitError(
                f"OpenFlamingo added token '{token}' (row {base + j} of '{key}') is not an added token of this model's "
                f"tokenizer; check init_from.added_tokens against the checkpoint's tokenizer"
            )
        out[token_id] = value[base + j]
    return out


def map_openflamingo_state_dict(
    of_state: Mapping[str, torch.Tensor], model: nn.Module, added_tokens: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """OpenFlamingo ``Flamingo`` state dict -> the same tensors under ``model``'s (a
    :class:`~vlmkit.core.compose.VisionLanguageModel`) names.

    Every key is mapped or listed in :data:`IGNORED`; every mapped key must exist in ``model`` with
    the same shape (``perceiver.media_time_embs`` drops its singleton axis). Tensors that reach the
    same vlmkit key under two OpenFlamingo names (OpenFlamingo registers the cross-attention blocks
    and decoder layers twice) must be equal. Otherwise a :class:`VlmkitError` names the key.

    ``added_tokens``: the tokens OpenFlamingo appended to the vocabulary, in its order (released
    checkpoints: ``<|endofchunk|>``, ``<image>``, then ``<PAD>``). vlmkit adds its tokens in another
    order, so the embedding tables' rows are moved token by token (:func:`_move_token_rows`); none:
    the tables are copied as they are (the checkpoint was made with this model's tokenizer)."""
    _check_model(model)
    layers_path = _layers_path(model)
    layer_indices = list(model.fusion.layer_indices)
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    embeddings = _embedding_keys(model) if added_tokens is not None else set()
    if of_state and all(k.startswith("module.") for k in of_state):  # saved from DistributedDataParallel
        of_state = {k.removeprefix("module."): v for k, v in of_state.items()}
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in of_state.items():
        if not isinstance(value, torch.Tensor):
            raise VlmkitError(f"OpenFlamingo key '{key}' holds a {type(value).__name__}, not a tensor")
        if ignored_reason(key) is not None:
            continue
        new = _target(key, layers_path, layer_indices)
        if new is None:
            raise VlmkitError(
                f"OpenFlamingo key '{key}' is not known: expected perceiver.*, vision_encoder.* or lang_encoder.*"
            )
        if new not in shapes:
            raise VlmkitError(f"OpenFlamingo key '{key}' maps to '{new}', which this vlmkit model does not have")
        if new in embeddings:
            value = _move_token_rows(key, value, own[new], model, added_tokens)
        if tuple(value.shape) != shapes[new]:
            if new == "connector.media_time_embeddings" and value.dim() == 3 and value.shape[1] == 1:
                value = value.squeeze(1)
            if tuple(value.shape) != shapes[new]:
                raise VlmkitError(
                    f"OpenFlamingo key '{key}' has shape {tuple(value.shape)} but '{new}' in this vlmkit model has "
                    f"shape {shapes[new]}"
                )
        if new in out:
            if not torch.equal(out[new], value):
                raise VlmkitError(
                    f"OpenFlamingo keys '{source[new]}' and '{key}' both map to '{new}' but hold different tensors"
                )
            continue
        out[new] = value
        source[new] = key
    return out


def _check_token_norm(model: nn.Module) -> None:
    """Warn when the encoder is vlmkit's ``open_clip`` with ``ln_post: true`` (see the module doc)."""
    module = sys.modules.get("vlmkit.encoders.open_clip")  # loaded if the model has such an encoder
    if module is not None and isinstance(model.encoder, module.OpenClipEncoder):
        if model.encoder.config.ln_post:
            warnings.warn(
                "OpenFlamingo import: this model's open_clip encoder gives its tokens after the final LayerNorm "
                "(model.encoder.ln_post: true), but OpenFlamingo (and Otter) trained the perceiver on the last "
                "layer's tokens without it (open_clip 2.16-2.20); set model.encoder.ln_post: false",
                TokenNormWarning,
                stacklevel=3,
            )


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VlmkitError(f"OpenFlamingo checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in {".pt", ".pth", ".bin", ".ckpt"}:
        raise VlmkitError(f"OpenFlamingo checkpoint '{path}': unknown suffix; allowed .safetensors, .pt, .pth, .bin, .ckpt")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable or unsafe file is the user's to replace
        raise VlmkitError(f"OpenFlamingo checkpoint '{path}' cannot be read as a weights-only state dict: {exc}") from None
    return _unwrap(state, str(path))


def _unwrap(state: Any, what: str) -> dict[str, torch.Tensor]:
    """A training checkpoint's ``model_state_dict`` (OpenFlamingo's resume files) or ``state_dict``."""
    if isinstance(state, Mapping):
        for inner in ("model_state_dict", "state_dict"):
            if isinstance(state.get(inner), Mapping):
                state = state[inner]
                break
    if not isinstance(state, Mapping):
        raise VlmkitError(f"OpenFlamingo checkpoint {what} is a {type(state).__name__}, not a state dict")
    return dict(state)


def import_openflamingo(
    model: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor], *, strict: bool = True,
    added_tokens: Sequence[str] | None = None,
) -> list[str]:
    """Copy an OpenFlamingo checkpoint (a ``.safetensors`` / ``.pt`` / ``.bin`` file or a state dict)
    into ``model``; returns the vlmkit keys loaded, sorted.

    ``strict``: the checkpoint must cover every connector and fusion tensor (what OpenFlamingo
    trains; its released ``checkpoint.pt`` always does). The encoder and decoder may be partly or
    wholly absent: they keep the weights they were built with. ``added_tokens``: see
    :func:`map_openflamingo_state_dict`."""
    if isinstance(path_or_state, (str, Path)):
        state = _read(Path(path_or_state).expanduser())
    else:
        state = _unwrap(path_or_state, "(a mapping)")
    mapped = map_openflamingo_state_dict(state, model, added_tokens)
    _check_token_norm(model)
    if strict:
        own = model.state_dict()
        missing = [k for k in own if k.startswith(("connector.", "fusion.")) and k not in mapped]
        if missing:
            raise VlmkitError(
                f"OpenFlamingo checkpoint lacks {len(missing)} connector/fusion tensors of this model, e.g. "
                f"{missing[:3]}; check the perceiver and fusion settings (or pass strict=False)"
            )
    result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:  # cannot happen after the mapping's checks; kept as a guard
        raise VlmkitError(f"OpenFlamingo import: keys not in the model: {result.unexpected_keys[:3]}")
    return sorted(mapped)
