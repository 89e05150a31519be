"""Applying a stage's tune modes: which parameters of each component train.

``frozen``: none. ``full``: all. ``lora``: peft LoRA adapters injected into the component (once;
later stages reuse them), only the adapters train. ``partial``: the named sub-modules, or the last
k decoder layers. Then ``embeddings`` (unless ``inherit``) sets the decoder's token embedding
tables: ``frozen``, ``new_tokens`` (only the rows of added tokens) or ``all``. Last, every
parameter that now trains is kept in fp32 (:func:`upcast_trainable_to_fp32`: master weights for
bf16 / fp16 compute under autocast).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.schema import StageTune, TuneSpec


def apply_tuning(model: Any, tune: StageTune, stage_label: str) -> dict[str, dict[str, int]]:
    """Set ``requires_grad`` on every parameter of ``model`` as ``tune`` says, then keep every
    trainable parameter in fp32 (:func:`upcast_trainable_to_fp32`).
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
    upcast_trainable_to_fp32(model)
    return report


#: storage dtypes whose trainable parameters are upcast to fp32 master weights
HALF_DTYPES = (torch.bfloat16, torch.float16)


def upcast_trainable_to_fp32(model: nn.Module) -> list[str]:
    """Mixed precision's master weights: every trainable parameter of ``model`` (``requires_grad``)
    stored in bf16 or fp16 is converted to fp32, in place; frozen parameters keep their dtype.

    A component loaded in bf16 (``model.decoder.dtype: bfloat16``) then trains fp32 weights while
    its frozen weights stay bf16: the optimizer updates fp32 values (in bf16, AdamW's small steps
    mostly round away: at lr 2e-5 about three quarters of the weights never change), and the
    compute runs in bf16 under the stage's autocast (``precision: bf16``), which casts the fp32
    weights for each matrix product. Covered: fully and partially trained components, LoRA
    adapters (peft creates them in their base layer's dtype) and the embedding tables (all of
    them, also with ``new_tokens``, whose other rows stay as loaded since their gradient is masked).

    - The ``torch.nn.Parameter`` objects stay the same (only their ``.data`` is replaced), so tied
      weights (input and output embeddings), gradient hooks and optimizer references keep working;
      a stale gradient of the old dtype is dropped.
    - Nothing is ever cast back: a parameter trained in one stage and frozen in a later one stays
      fp32 (checkpoints and exports then hold the trained values without a second rounding).
    - Idempotent: a resumed run applies every stage's tuning again and gets the same dtypes.
    - The half dtype the parameters came from is recorded on ``model.compute_dtype`` (when
      ``model`` has that attribute, as :class:`~vlmkit.core.compose.VisionLanguageModel` does),
      so the model's own ``forward`` and ``generate`` run under autocast in it outside the engine.

    Returns the names of the parameters upcast by this call."""
    upcast: list[str] = []
    source: torch.dtype | None = None
    for name, param in model.named_parameters():  # a tied parameter is listed once
        if not param.requires_grad or param.dtype not in HALF_DTYPES:
            continue
        source = source or param.dtype
        with torch.no_grad():
            param.data = param.data.to(torch.float32)
        if param.grad is not None and param.grad.dtype != torch.float32:
            param.grad = None
        upcast.append(name)
    if source is not None and getattr(model, "compute_dtype", False) is None:
        model.compute_dtype = source
    return upcast


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
