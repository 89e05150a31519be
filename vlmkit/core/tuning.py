"""Applying a stage's tune modes: which parameters of each component train.

``frozen``: none. ``full``: all. ``lora``: peft LoRA adapters injected into the component (once;
later stages reuse them), only the adapters train. ``partial``: the named sub-modules, or the last
k decoder layers. Then ``embeddings`` (unless ``inherit``) sets the decoder's token embedding
tables: ``frozen``, ``new_tokens`` (only the rows of added tokens) or ``all``. Last, every
parameter that now trains is kept in fp32 (:func:`upcast_trainable_to_fp32`: master weights for
bf16 / fp16 compute under autocast).

``new_tokens`` trains a small parameter per table that holds only the added rows
(:class:`NewTokenRows`), so the gradient, AdamW's moments and the clipping cover those rows
alone instead of the whole table (for SmolLM2 about 340 MB less per step). The tables themselves
stay frozen; each row parameter is a view of its table's rows (the same memory), so the tables
always hold the trained values: checkpoints and exports write the tables as before.

A stage's tuning is one object, :class:`StageTuning`, whose :meth:`StageTuning.apply` returns a
:class:`TuningRecord`: exactly what it made trainable (parameter names as checkpoints store them,
the LoRA config and wrapped modules per component, the embedding rows), the counts per component,
and the gradient masks it registered (removed by the next stage's ``apply``). The engine's
checkpoints store the records as ``tuning.json`` beside the weights. LoRA adapters are recognised
as peft's adapter layers (:func:`adapter_layers`), never by a parameter name.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.schema import StageTune, TuneSpec


@dataclass
class TuningRecord:
    """What one stage's tuning made trainable (:meth:`StageTuning.apply`).

    ``names``: the trained parameters as checkpoints store them (a row parameter of
    :class:`NewTokenRows` as the table it is a view of); ``lora``: per component the LoRA config
    its adapters were injected with and the exact modules they wrap (relative to the component);
    ``embeddings``: the stage's embedding mode and ``embedding_rows`` the token ids whose rows
    train (``new_tokens``); ``report``: ``{component: {"trainable": n, "frozen": n}}``;
    ``gradient_masks``: the hooks masking the tables' gradients (``new_tokens`` without row
    parameters), removed by the next stage's :meth:`StageTuning.apply`."""

    stage: str
    names: list[str]
    lora: dict[str, dict[str, Any]]
    embeddings: str
    embedding_rows: list[int]
    report: dict[str, dict[str, int]]
    gradient_masks: list[Any] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data (without the hooks)."""
        return {"stage": self.stage, "names": self.names, "lora": self.lora, "embeddings": self.embeddings,
                "embedding_rows": self.embedding_rows, "report": self.report}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TuningRecord":
        return cls(stage=str(data["stage"]), names=list(data["names"]), lora=dict(data["lora"]),
                   embeddings=str(data["embeddings"]), embedding_rows=[int(i) for i in data["embedding_rows"]],
                   report=dict(data["report"]))

    def release(self) -> None:
        """Remove the gradient masks this tuning registered."""
        for handle in self.gradient_masks:
            handle.remove()
        self.gradient_masks = []


def records_json(records: list[TuningRecord]) -> str:
    """Tuning records as the text of ``tuning.json``."""
    return json.dumps([r.to_json() for r in records], indent=1) + "\n"


class StageTuning:
    """One stage's tune modes (``tune``, reported at ``where``, e.g. ``stages.1.tune``) as one object.

    ``new_token_rows``: ``embeddings: new_tokens`` trains row parameters of the added tokens only
    (:class:`NewTokenRows`); False keeps the whole tables trainable with a gradient mask (dense
    gradient and AdamW state; the engine uses it where the optimizer shards parameters: FSDP,
    DeepSpeed)."""

    def __init__(self, tune: StageTune, where: str, *, new_token_rows: bool = True):
        self.tune = tune
        self.where = where
        self.new_token_rows = new_token_rows

    def apply(self, model: Any, previous: TuningRecord | None = None) -> TuningRecord:
        """Set ``requires_grad`` on every parameter of ``model`` as the tune modes say (injecting
        LoRA adapters where a component first trains with LoRA), then keep every trainable parameter
        in fp32 (:func:`upcast_trainable_to_fp32`). ``previous``: the record of the tuning applied
        before on this model, whose gradient masks are removed; a previous stage's row parameters
        are removed too (their values are in the tables), so ``inherit`` follows the decoder's mode.
        Returns exactly what is trainable now."""
        release_new_token_rows(model.decoder)
        if previous is not None:
            previous.release()
        report: dict[str, dict[str, int]] = {}
        lora: dict[str, dict[str, Any]] = {}
        for name in ("encoder", "connector", "fusion", "decoder"):
            module: nn.Module = getattr(model, name)
            spec: TuneSpec = getattr(self.tune, name)
            config = _apply(module, spec, f"{self.where}.{name}")
            if config is not None:
                lora[name] = config
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            total = sum(p.numel() for p in module.parameters())
            report[name] = {"trainable": trainable, "frozen": total - trainable}
        masks: list[Any] = []
        rows: list[int] = []
        if self.tune.embeddings != "inherit":
            report["embeddings"], masks = _tune_embeddings(model, self.tune.embeddings, f"{self.where}.embeddings",
                                                           self.new_token_rows)
            if self.tune.embeddings == "new_tokens":
                rows = sorted(set(model.decoder.new_token_ids))
        upcast_trainable_to_fp32(model)
        return TuningRecord(self.where.removesuffix(".tune"), sorted(trained_names(model)), lora,
                            self.tune.embeddings, rows, report, masks)


def apply_tuning(
    model: Any, tune: StageTune, stage_label: str, *, new_token_rows: bool = True, previous: TuningRecord | None = None,
) -> TuningRecord:
    """``StageTuning(tune, f"{stage_label}.tune", new_token_rows=...).apply(model, previous)``."""
    return StageTuning(tune, f"{stage_label}.tune", new_token_rows=new_token_rows).apply(model, previous)


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
        _to_fp32(param)
        upcast.append(name)
    _record_compute_dtype(model, source)
    return upcast


def _to_fp32(param: nn.Parameter) -> None:
    """``param`` converted to fp32 in place (the same Parameter object; a stale gradient dropped)."""
    with torch.no_grad():
        param.data = param.data.to(torch.float32)
    if param.grad is not None and param.grad.dtype != torch.float32:
        param.grad = None


def _record_compute_dtype(model: Any, source: torch.dtype | None) -> None:
    if source is not None and getattr(model, "compute_dtype", False) is None:
        model.compute_dtype = source


def embedding_tables(decoder: Any) -> list[nn.Parameter]:
    """The decoder's input embedding table and, if untied, its output head."""
    tables = [decoder.get_input_embeddings().weight]
    out = decoder.get_output_embeddings()
    if out is not None:
        tables.append(out.weight)
    return tables


def _tune_embeddings(model: Any, mode: str, where: str, new_token_rows: bool = True) -> tuple[dict[str, int], list[Any]]:
    """Set the embedding tables' training. ``new_tokens``: row parameters of the added tokens
    (:class:`NewTokenRows`), or, where those cannot be spliced in (or ``new_token_rows`` is False),
    the whole tables with a gradient hook that masks every row but the added tokens' (AdamW's
    moments then stay zero there and, without weight decay on embeddings, those rows never move).
    Returns the trainable / frozen counts of the tables and the gradient-mask hooks registered."""
    decoder = model.decoder
    tables = embedding_tables(decoder)
    total = sum(t.numel() for t in tables)
    if mode == "frozen":
        for t in tables:
            t.requires_grad_(False)
        return {"trainable": 0, "frozen": total}, []
    if mode == "all":
        for t in tables:
            t.requires_grad_(True)
        return {"trainable": total, "frozen": 0}, []
    ids = sorted(set(decoder.new_token_ids))
    if not ids:
        raise VlmkitError(f"{where}: 'new_tokens' but the decoder has no added tokens; use 'all' or 'frozen'")
    trainable = len(ids) * sum(t.shape[1] for t in tables)
    if new_token_rows and NewTokenRows.supported(decoder):
        # master weights: the rows are views of the tables, so the tables become fp32 (as with
        # a trainable table); the rest of a table is frozen and never changes
        half = next((t.dtype for t in tables if t.dtype in HALF_DTYPES), None)
        for t in tables:
            t.requires_grad_(False)
            if t.dtype in HALF_DTYPES:
                _to_fp32(t)
        _record_compute_dtype(model, half)
        decoder.new_token_rows = NewTokenRows(decoder, ids)
        return {"trainable": trainable, "frozen": total - trainable}, []
    masks = []
    for t in tables:
        t.requires_grad_(True)
        mask = torch.zeros(t.shape[0], 1, dtype=t.dtype, device=t.device)
        mask[ids] = 1
        masks.append(t.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype)))
    return {"trainable": trainable, "frozen": total - trainable}, masks


# ------------------------------------------------------------------------------ new-token rows
def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as ``[start, end)`` runs of consecutive ids (added tokens are usually one run)."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _output_head(decoder: Any) -> nn.Module | None:
    """The module that projects onto the vocabulary: the untied head, or (tied) the module other
    than the input embedding whose ``weight`` is the input table."""
    head = decoder.get_output_embeddings()
    if head is not None:
        return head
    embedding = decoder.get_input_embeddings()
    table = embedding.weight
    return next((m for m in decoder.modules() if m is not embedding and getattr(m, "weight", None) is table), None)


class NewTokenRows(nn.Module):
    """The trainable rows of the added tokens (``decoder.new_token_ids``) for ``embeddings: new_tokens``.

    One parameter per table and run of consecutive ids (``input_0``; ``output_0`` for an untied
    head), each a view of its table's rows: the same memory, so an optimizer step on a row
    parameter updates the table, and the tables (frozen, fp32) always hold the trained values.
    Checkpoints, exports and ``state_dict`` therefore see the tables only; this module writes
    nothing to a state dict and reads nothing from one.

    Forward hooks splice the rows into the computation so that their gradient reaches them:

    - the input embedding: the positions of added tokens take their vectors from the row
      parameter (the same values the table holds);
    - the output head: the added tokens' logits get ``h @ rows.T - (h @ rows.T).detach()``
      added, zero in value (the logits stay bitwise what the head computed) but with the
      gradient of those logits with respect to the rows; the gradient with respect to ``h``
      comes from the head's own product, as before.

    The frozen tables get no gradient at all: no dense ``(vocab, width)`` gradient, AdamW state or
    head weight-gradient product. Supported where the input embedding is a plain ``nn.Embedding``
    and the head a plain ``nn.Linear`` (:meth:`supported`); otherwise the tuning masks the
    gradient of the whole tables instead. The views must stay views: moving the model to another
    device or dtype after the tuning breaks them, which the next forward reports."""

    def __init__(self, decoder: Any, ids: list[int]):
        super().__init__()
        embedding = decoder.get_input_embeddings()
        head = _output_head(decoder)
        table = embedding.weight
        untied = head.weight is not table
        self._tables = (table, head.weight) if untied else (table,)  # a tuple: not registered here
        self.runs = _runs(ids)
        self._names: dict[str, list[str]] = {"input": [], "output": []}
        for kind, tab in zip(("input", "output"), self._tables):
            for k, (start, end) in enumerate(self.runs):
                name = f"{kind}_{k}"
                self.register_parameter(name, nn.Parameter(tab.data[start:end]))
                self._names[kind].append(name)
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=table.device), persistent=False)
        slot = torch.full((table.shape[0],), -1, dtype=torch.long, device=table.device)
        slot[self.token_ids] = torch.arange(len(ids), device=table.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row among the added ones
        pad = embedding.padding_idx
        self.padding_row = ids.index(pad) if pad is not None and pad in ids else None  # its row gets no gradient
        self._handles = [
            embedding.register_forward_hook(self._splice_lookup),
            head.register_forward_hook(self._splice_head),
        ]

    @staticmethod
    def supported(decoder: Any) -> bool:
        embedding = decoder.get_input_embeddings()
        head = _output_head(decoder)
        return (
            type(embedding) is nn.Embedding  # a subclass may scale or otherwise change the lookup
            and not embedding.sparse
            and head is not None
            and type(head) is nn.Linear
        )

    # ---------------------------------------------------------------- the rows
    def parameters_of(self, kind: str) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._names[kind]]

    def tables(self) -> dict[nn.Parameter, list[nn.Parameter]]:
        """Each table and its row parameters (the input table first)."""
        kinds = ("input", "output")[: len(self._tables)]
        return {tab: self.parameters_of(kind) for tab, kind in zip(self._tables, kinds)}

    def _rows(self, kind: str) -> torch.Tensor:
        """The rows of ``kind`` as one ``(added, width)`` tensor, in ``token_ids`` order."""
        self._check_views()
        params = self.parameters_of(kind if kind == "input" or len(self._tables) == 2 else "input")
        return params[0] if len(params) == 1 else torch.cat(params)

    def rebind(self) -> None:
        """Make the row parameters views of the tables again after something copied the model's
        tensors while keeping their values (``model.to("cpu:0")`` in accelerate's ``prepare`` on
        several CPU processes copies every tensor): the same Parameter objects (optimizer and DDP
        references stay valid), pointed at their tables' rows. Rows whose values differ from their
        table's are an error: the two were updated apart."""
        for tab, params in self.tables().items():
            for (start, end), param in zip(self.runs, params):
                if self._is_view(tab, start, param):
                    continue
                if param.shape != tab[start:end].shape or not torch.equal(param.detach().to(tab.device, tab.dtype), tab.detach()[start:end]):
                    raise RuntimeError("tune.embeddings new_tokens: the row parameters and the embedding table hold "
                                       "different values; apply the stage's tuning again")
                with torch.no_grad():
                    param.data = tab.data[start:end]
        self.token_ids = self.token_ids.to(self._tables[0].device)
        self.slot = self.slot.to(self._tables[0].device)

    @staticmethod
    def _is_view(tab: torch.Tensor, start: int, param: torch.Tensor) -> bool:
        return (param.device == tab.device and param.dtype == tab.dtype
                and param.data_ptr() == tab.data_ptr() + start * tab.stride(0) * tab.element_size())

    def _check_views(self) -> None:
        for tab, params in self.tables().items():
            for (start, _), param in zip(self.runs, params):
                if not self._is_view(tab, start, param):
                    raise RuntimeError(
                        "tune.embeddings new_tokens: the row parameters are no longer views of the embedding table "
                        "(the model was moved to another device or dtype after its stage's tuning); call "
                        "NewTokenRows.rebind() after moving it, or apply the tuning again"
                    )

    # ---------------------------------------------------------------- the hooks
    def _splice_lookup(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]
        slot = self.slot[input_ids]
        rows = F.embedding(slot.clamp(min=0), self._rows("input"), padding_idx=self.padding_row)
        return torch.where((slot >= 0).unsqueeze(-1), rows.to(out.dtype), out)

    def _splice_head(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        hidden = args[0]
        new = F.linear(hidden.detach(), self._rows("output"))  # (..., added): the rows' gradient path
        return out.index_add(-1, self.token_ids, (new - new.detach()).to(out.dtype))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---------------------------------------------------------------- no state of its own
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        return  # the values live in the tables, which the decoder's state holds

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        return


def new_token_rows(decoder: Any) -> NewTokenRows | None:
    rows = getattr(decoder, "new_token_rows", None)
    return rows if isinstance(rows, NewTokenRows) else None


def release_new_token_rows(decoder: Any) -> None:
    """Remove the row parameters and their hooks (the tables already hold their values)."""
    rows = new_token_rows(decoder)
    if rows is not None:
        rows.remove()
        del decoder.new_token_rows


def trained_names(model: nn.Module) -> set[str]:
    """Names of the parameters that train now, as checkpoints store them: a row parameter of
    :class:`NewTokenRows` is stored as (the name of) the table it is a view of."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    rows = new_token_rows(getattr(model, "decoder", None))
    if rows is None:
        return names
    table_names = {id(p): n for n, p in model.named_parameters()}  # a tied table: its first name
    for table, params in rows.tables().items():
        row_ids = {id(p) for p in params}
        names -= {n for n, p in model.named_parameters() if id(p) in row_ids}
        names.add(table_names[id(table)])
    return names


def fit_row_moments(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """After loading an optimizer state written when ``new_tokens`` trained whole tables (older
    vlmkit): the moments of each row parameter cut from its table-sized ones. Returns how many
    state tensors were cut; a shape that fits neither is an error."""
    rows = new_token_rows(getattr(model, "decoder", None))
    owners = {}
    if rows is not None:
        for table, params in rows.tables().items():
            for (start, end), param in zip(rows.runs, params):
                owners[id(param)] = (table.shape, start, end)
    cut = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape == param.shape:
                    continue
                owner = owners.get(id(param))
                if owner is None or value.shape != owner[0]:
                    raise VlmkitError(
                        f"the optimizer state has '{key}' of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(param.shape)}; the checkpoint does not belong to this stage's parameters"
                    )
                optimizer.state[param][key] = value[owner[1] : owner[2]].clone()
                cut += 1
    return cut


def adapter_layers(module: nn.Module) -> dict[str, nn.Module]:
    """peft's adapter layers (``BaseTunerLayer``) inside ``module``, by module name. Without peft
    imported there are none (injecting adapters imports it)."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_parameters(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter weights of one peft adapter layer (its ``adapter_layer_names`` sub-modules:
    ``lora_A``, ``lora_B`` ...), by name inside the layer; the wrapped base layer is not among them."""
    out = []
    for attr in layer.adapter_layer_names:
        sub = getattr(layer, attr, None)
        if isinstance(sub, nn.Module):
            out.extend((f"{attr}.{n}", p) for n, p in sub.named_parameters())
    return out


def lora_config(record: dict[str, Any]) -> Any:
    """The peft ``LoraConfig`` of a LoRA record (:attr:`TuningRecord.lora`, an export's
    ``adapters.json``): the one place it is built."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(record["r"]), lora_alpha=float(record["alpha"]), lora_dropout=float(record.get("dropout", 0.0)),
        target_modules=list(record["target_modules"]), fan_in_fan_out=bool(record.get("fan_in_fan_out", False)),
    )


def _apply(module: nn.Module, spec: TuneSpec, where: str) -> dict[str, Any] | None:
    """Set the component's ``requires_grad``; returns its LoRA record for ``lora``, else None."""
    if spec.mode == "frozen":
        module.requires_grad_(False)
    elif spec.mode == "full":
        module.requires_grad_(True)
    elif spec.mode == "lora":
        record = _inject_lora(module, spec, where)
        module.requires_grad_(False)
        for layer in adapter_layers(module).values():
            for _, param in adapter_parameters(layer):
                param.requires_grad_(True)
        return record
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
    return None


def _inject_lora(module: nn.Module, spec: TuneSpec, where: str) -> dict[str, Any]:
    """Inject LoRA adapters into ``module`` (once: a component that has adapters keeps them, later
    stages train those). Returns the record: the config and the exact modules wrapped."""
    existing = adapter_layers(module)
    if existing:
        first = next(iter(existing.values()))
        adapter = next(iter(first.r))
        dropout = first.lora_dropout[adapter]
        return {
            "adapter_name": adapter, "r": int(first.r[adapter]), "alpha": float(first.lora_alpha[adapter]),
            "dropout": float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
            "fan_in_fan_out": bool(getattr(first, "fan_in_fan_out", False)), "target_modules": sorted(existing),
        }
    from peft import inject_adapter_in_model

    lora = spec.lora
    targets = lora.target_modules
    if targets is None:
        targets_of = getattr(module, "lora_target_modules", None)
        if targets_of is None:
            raise VlmkitError(f"{where}.lora.target_modules: this component has no default LoRA targets; name them")
        targets = targets_of()
    record = {"adapter_name": "default", "r": lora.r, "alpha": float(lora.alpha), "dropout": float(lora.dropout),
              "fan_in_fan_out": False, "target_modules": list(targets)}
    try:
        inject_adapter_in_model(lora_config(record), module)
    except ValueError as exc:
        raise VlmkitError(f"{where}.lora.target_modules: {exc}") from None
    return {**record, "target_modules": sorted(adapter_layers(module))}
