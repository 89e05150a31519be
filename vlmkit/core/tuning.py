"""Applying a stage's tune modes: which parameters of each component train.

``frozen``: none. ``full``: all. ``lora``: peft LoRA adapters injected into the component (once;
later stages reuse them), only the adapters train. ``partial``: the named sub-modules, or the last
k decoder layers. Then ``embeddings`` (unless ``inherit``) sets the decoder's token embedding
tables: ``frozen``, ``new_tokens`` (only the rows of added tokens) or ``all``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.schema import StageTune, TuneSpec


def apply_tuning(model: Any, tune: StageTune, stage_label: str) -> dict[str, dict[str, int]]:
    """Set ``requires_grad`` on every parameter of ``model`` as ``tune`` says.
    Returns ``{component: {"trainable": n, "frozen": n}}``."""
    report: dict[str, dict[str, int]] = {}
    for name in ("encoder", "connector", "fusion", "decoder"):
        module: nn.Module = getattr(model, name)
        spec: TuneSpec = getattr(tune, name)
        _apply(module, spec, f"{stage_label}.tune.{name}")
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        report[name] = {"trainable": trainable, "frozen": total - trainable}
    if tune.embeddings != "inherit":
        rows = _tune_embeddings(model.decoder, tune.embeddings, f"{stage_label}.tune.embeddings")
        report["embeddings"] = rows
    return report


def embedding_tables(decoder: Any) -> list[nn.Parameter]:
    """The decoder's input embedding table and, if untied, its output head."""
    tables = [decoder.get_input_embeddings().weight]
    out = decoder.get_output_embeddings()
    if out is not None:
        tables.append(out.weight)
    return tables


def _tune_embeddings(decoder: Any, mode: str, where: str) -> dict[str, int]:
    """Set the embedding tables' training; ``new_tokens`` masks the gradient of every row but the
    added tokens' (a gradient hook, so AdamW's moments stay zero there and, without weight decay
    on embeddings, those rows never move). Returns the trainable / frozen counts of the tables."""
    for handle in getattr(decoder, "_vlmkit_embedding_hooks", []):
        handle.remove()
    decoder._vlmkit_embedding_hooks = []
    tables = embedding_tables(decoder)
    total = sum(t.numel() for t in tables)
    if mode == "frozen":
        for t in tables:
            t.requires_grad_(False)
        return {"trainable": 0, "frozen": total}
    for t in tables:
        t.requires_grad_(True)
    if mode == "all":
        return {"trainable": total, "frozen": 0}
    ids = sorted(set(decoder.new_token_ids))
    if not ids:
        raise VlmkitError(f"{where}: 'new_tokens' but the decoder has no added tokens; use 'all' or 'frozen'")
    trainable = 0
    for t in tables:
        mask = torch.zeros(t.shape[0], 1, dtype=t.dtype, device=t.device)
        mask[ids] = 1
        decoder._vlmkit_embedding_hooks.append(t.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype)))
        trainable += len(ids) * t.shape[1]
    return {"trainable": trainable, "frozen": total - trainable}


def _apply(module: nn.Module, spec: TuneSpec, where: str) -> None:
    if spec.mode == "frozen":
        module.requires_grad_(False)
    elif spec.mode == "full":
        module.requires_grad_(True)
    elif spec.mode == "lora":
        _inject_lora(module, spec, where)
        for pname, param in module.named_parameters():
            param.requires_grad_("lora_" in pname)
    elif spec.mode == "partial":
        module.requires_grad_(False)
        if spec.modules:
            named = dict(module.named_modules())
            for sub in spec.modules:
                if sub not in named:
                    children = [n for n, _ in module.named_children()]
                    raise VlmkitError(f"{where}.modules: no sub-module '{sub}'; top-level sub-modules: {', '.join(children)}")
                named[sub].requires_grad_(True)
        if spec.last_layers:
            layers_of = getattr(module, "decoder_layers", None)
            if layers_of is None:
                raise VlmkitError(f"{where}.last_layers: only the decoder has layers to count; use 'modules' here")
            layers = layers_of()
            if spec.last_layers > len(layers):
                raise VlmkitError(f"{where}.last_layers: {spec.last_layers} is more than the decoder's {len(layers)} layers")
            for layer in list(layers)[-spec.last_layers :]:
                layer.requires_grad_(True)


def _inject_lora(module: nn.Module, spec: TuneSpec, where: str) -> None:
    if any("lora_" in n for n, _ in module.named_parameters()):
        return
    from peft import LoraConfig, inject_adapter_in_model

    lora = spec.lora
    targets = lora.target_modules
    if targets is None:
        targets_of = getattr(module, "lora_target_modules", None)
        if targets_of is None:
            raise VlmkitError(f"{where}.lora.target_modules: this component has no default LoRA targets; name them")
        targets = targets_of()
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    try:
        inject_adapter_in_model(config, module)
    except ValueError as exc:
        raise VlmkitError(f"{where}.lora.target_modules: {exc}") from None
