"""Exporting a trained model and loading it back.

An export is a folder::

    recipe.yaml            the resolved recipe: rebuilds the model (backbones, widths, added tokens)
    model.safetensors      the weights of every part the recipe's stages train, keyed by their plain
                           names in the model (LoRA merged into the base weights with merge_lora)
    adapters.safetensors   merge_lora=False only: the LoRA adapter weights, keyed as in the model
    adapters.json          merge_lora=False only: per component, the LoRA config that re-injects them
    tokenizer/             the decoder tokenizer (save_pretrained, added special tokens included)
    export.json            format, versions, merge_lora, per file its keys and what it holds

Parts that no stage trains are not written: :func:`load` rebuilds them from the recipe (the seeded
random initialisation or the named pretrained weights) and then loads the exported weights over
them. Only safetensors is read back; nothing is unpickled.

Dtypes: every weight is written in the dtype the model stores it in, so trained parameters are
their fp32 master weights even where the recipe loads the component in bf16 / fp16
(:func:`vlmkit.core.tuning.upcast_trainable_to_fp32`), and LoRA adapters are merged in fp32 over
such a base; frozen parts that are written (buffers) keep their dtype. ``export.json`` lists the
dtypes of each file. :func:`load` builds the model in the dtypes its recipe names and casts the
exported weights to them (a decoder with ``dtype: bfloat16`` gets the fp32 weights rounded to bf16).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vlmkit.core.checkpoint import atomic_dir
from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.loader import ResolvedRecipe
from vlmkit.core.recipe.schema import COMPONENTS, Recipe
from vlmkit.core.tuning import adapter_parameters

FORMAT = "vlmkit-export"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.yaml"
MODEL_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
ADAPTERS_CONFIG = "adapters.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_JSON = "export.json"
#: every file and folder an export writes; other files in an export folder are never touched
EXPORT_FILES = (RECIPE_FILE, MODEL_FILE, ADAPTERS_FILE, ADAPTERS_CONFIG, TOKENIZER_DIR, EXPORT_JSON)
_BASE = "base_layer"
_LEFTOVER = re.compile(r"^\.(" + "|".join(re.escape(n) for n in EXPORT_FILES) + r")\.old-\d+$")


# ------------------------------------------------------------------------------ the model's state
def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft adapter layers of ``model`` (outermost wrappers), by module name."""
    from vlmkit.core.tuning import adapter_layers

    layers = adapter_layers(model)
    nested = [n for n in layers if any(n.startswith(o + ".") for o in layers if o != n)]
    if nested:
        raise VlmkitError(f"cannot export: '{nested[0]}' is an adapter layer inside another adapter layer")
    return layers


def _owner(key: str, tuners: dict[str, nn.Module]) -> str | None:
    """The adapter layer that ``key`` (a state-dict key) belongs to, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        if name in tuners:
            return name
    return None


def _plain(name: str, tuners: dict[str, nn.Module]) -> str:
    """A module or state-dict name without the adapter wrappers' ``base_layer`` step."""
    owner = _owner(name, tuners)
    if owner is None:
        return name
    rest = name[len(owner) + 1 :]
    if rest == _BASE or rest.startswith(_BASE + "."):
        return owner + rest[len(_BASE) :]
    return name


def _split_state(model: nn.Module, tuners: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s state as (base weights by plain name, adapter weights by their name in the model).
    A tensor that is tied to another (shared embeddings) appears once, under its first name."""
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        owner = _owner(key, tuners)
        rest = key[len(owner) + 1 :] if owner is not None else ""
        if owner is not None and not rest.startswith(_BASE + "."):
            adapters[key] = tensor
        else:
            base[_plain(key, tuners)] = tensor
    return base, adapters


def _version(package: str) -> str | None:
    try:
        return package_version(package)
    except PackageNotFoundError:
        return None


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().clone()


def _merged_base(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The base-layer state of adapter layer ``name`` with its adapters merged in, by plain name;
    merged on a copy of that one layer, so the live model is untouched. fp32 adapters (master
    weights) over a bf16 / fp16 base are merged into an fp32 copy of the base: the sum is written in
    fp32, not rounded to the base's dtype here."""
    if getattr(layer, "merged", False):  # already merged in the model: the base weights hold the sum
        merged = layer
    else:
        merged = copy.deepcopy(layer)
        if any(p.dtype == torch.float32 for _, p in adapter_parameters(merged)):
            for param in merged.get_base_layer().parameters():
                if param.dtype in (torch.bfloat16, torch.float16):
                    param.data = param.data.to(torch.float32)
        try:
            with torch.no_grad():
                merged.merge(safe_merge=True)
        except (ValueError, RuntimeError) as exc:
            raise VlmkitError(f"cannot merge the LoRA adapters of '{name}': {exc}") from None
    return {f"{name}.{k}": _cpu(v) for k, v in merged.get_base_layer().state_dict().items()}


# ------------------------------------------------------------------------------ what the stages train
class _Selection:
    """Plain state-dict keys the recipe's stages train and, per component, what was selected in
    which stages (for export.json)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.notes: dict[str, dict[tuple[str, str], list[str]]] = {c: {} for c in COMPONENTS}

    def add(self, keys: set[str], component: str, what: str, why: str, stage: str) -> None:
        self.keys |= keys
        stages = self.notes[component].setdefault((what, why), [])
        if stage not in stages:
            stages.append(stage)

    def describe(self, component: str, lora: str) -> list[str]:
        lines = []
        for (what, why), stages in self.notes[component].items():
            label = lora if what == _LORA else what
            lines.append(f"{label} ({why} in stage{'s' if len(stages) > 1 else ''} {', '.join(stages)})")
        return lines


_LORA = "LoRA"


def _select(
    model: nn.Module, recipe: Recipe, base: dict[str, torch.Tensor], tuners: dict[str, nn.Module]
) -> _Selection:
    from vlmkit.core.tuning import embedding_tables

    param_ids = {id(p) for p in model.parameters()}
    sel = _Selection()

    def under(prefix: str) -> set[str]:
        return {k for k in base if k.startswith(prefix)}

    for stage in recipe.stages:
        for comp in COMPONENTS:
            spec = getattr(stage.tune, comp)
            where = f"stage {stage.name}"
            if spec.mode == "frozen":
                continue
            buffers = {k for k in under(f"{comp}.") if id(base[k]) not in param_ids}
            if buffers:  # a component that trains runs in train mode: its statistics move
                sel.add(buffers, comp, "its buffers", "trains, runs in train mode", stage.name)
            if spec.mode == "full":
                sel.add(under(f"{comp}."), comp, "all weights", "full", stage.name)
            elif spec.mode == "partial":
                for sub in spec.modules or []:
                    sel.add(under(f"{comp}.{sub}."), comp, f"sub-module {sub}", "partial", stage.name)
                layers_of = getattr(getattr(model, comp), "decoder_layers", None)
                if spec.last_layers and layers_of is not None:
                    layers = layers_of()
                    names = [n for n, m in model.named_modules() if m is layers]
                    if names:
                        prefix = _plain(names[0], tuners)
                        for i in range(len(layers) - spec.last_layers, len(layers)):
                            sel.add(under(f"{prefix}.{i}."), comp, f"the last {spec.last_layers} layers", "partial", stage.name)
            elif spec.mode == "lora":
                mine = [n for n in tuners if n.startswith(f"{comp}.")]
                if not mine:
                    raise VlmkitError(
                        f"cannot export: the recipe tunes '{comp}' with LoRA in {where} but the model has no LoRA "
                        "adapters there; export the model the training returned"
                    )
                sel.add(set(), comp, _LORA, "lora", stage.name)
        if stage.tune.embeddings in ("new_tokens", "all"):
            ids = {id(t) for t in embedding_tables(model.decoder)}
            tables = {k for k, t in base.items() if id(t) in ids}
            sel.add(tables, "decoder", "the embedding tables", f"embeddings {stage.tune.embeddings}", stage.name)
    return sel


def _lora_config(comp: str, names: list[str], tuners: dict[str, nn.Module]) -> dict[str, Any]:
    """The config that re-injects the adapters of ``comp``: the exact module names it wraps."""
    configs = []
    for name in names:
        layer = tuners[name]
        adapters = list(getattr(layer, "r", {}))
        if len(adapters) != 1:
            raise VlmkitError(f"cannot export: '{name}' has {len(adapters)} adapters ({', '.join(adapters)}); expected one")
        adapter = adapters[0]
        dropout = layer.lora_dropout[adapter]
        configs.append(
            {
                "adapter_name": adapter,
                "r": int(layer.r[adapter]),
                "alpha": float(layer.lora_alpha[adapter]),
                "dropout": float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
                "fan_in_fan_out": bool(getattr(layer, "fan_in_fan_out", False)),
            }
        )
    first = configs[0]
    if any(c != first for c in configs):
        raise VlmkitError(f"cannot export: the LoRA layers of '{comp}' differ in their config; expected one config")
    return {**first, "target_modules": [n[len(comp) + 1 :] for n in names]}


def _describe(sel: _Selection, comp: str, lora_note: str | None) -> list[str]:
    lines = sel.describe(comp, lora_note or _LORA)
    if lora_note is not None and not any(what == _LORA for what, _ in sel.notes[comp]):
        lines.insert(0, f"{lora_note} (adapters found in the model)")
    return lines or ["not exported: frozen in every stage (rebuilt from the recipe)"]


def _dtype_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many tensors of each dtype (``{"float32": 12, "bfloat16": 2}``), for export.json."""
    counts: dict[str, int] = {}
    for tensor in tensors.values():
        key = str(tensor.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------ export
def stale_entries(folder: Path) -> list[Path]:
    """What an interrupted re-export leaves in export folder ``folder``: ``.<export file>.old-<pid>``."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if _LEFTOVER.match(p.name)) if folder.is_dir() else []


def check_export_target(out_dir: Path) -> None:
    """Refuse to export into an existing folder that holds files but is not a vlmkit export:
    an export never deletes or overwrites files vlmkit did not write."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise VlmkitError(f"cannot export to '{out_dir}': it is a file, not a folder")
    entries = [p for p in out_dir.iterdir() if not _LEFTOVER.match(p.name)]
    if not entries:
        return
    meta_path = out_dir / EXPORT_JSON
    try:
        is_export = json.loads(meta_path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_export = False
    if not is_export:
        raise VlmkitError(
            f"cannot export to '{out_dir}': the folder holds files and is not a vlmkit export (no {EXPORT_JSON} of "
            f"format '{FORMAT}'), and an export never replaces files it did not write; export to a new or empty "
            "folder, or move those files away"
        )


def export_model(model: nn.Module, resolved: ResolvedRecipe, out_dir: Path, *, merge_lora: bool = True) -> Path:
    """Write ``model`` (trained as ``resolved`` says) to the folder ``out_dir`` (atomically). Returns
    ``out_dir``. ``model`` is not changed.

    An existing vlmkit export there is replaced, but only the export's own files
    (:data:`EXPORT_FILES`): files someone added to the folder stay. A folder that holds files and
    is not a vlmkit export is refused (:class:`VlmkitError`), before anything is written."""
    import vlmkit

    out_dir = Path(out_dir)
    check_export_target(out_dir)
    for leftover in stale_entries(out_dir):  # an interrupted re-export's old files: vlmkit's own
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    recipe = resolved.recipe
    tuners = _tuner_layers(model)
    base, adapters = _split_state(model, tuners)
    sel = _select(model, recipe, base, tuners)

    # every adapter layer of the model is exported (it shapes the model's output), by component
    lora_comps = [c for c in COMPONENTS if any(n.startswith(f"{c}.") for n in tuners)]
    lora_layers = {c: sorted(n for n in tuners if n.startswith(f"{c}.")) for c in lora_comps}
    weights = {k: _cpu(base[k]) for k in sorted(sel.keys)}
    adapter_weights: dict[str, torch.Tensor] = {}
    adapter_configs: dict[str, Any] = {}
    lora_notes: dict[str, str] = {}
    for comp in lora_comps:
        names = lora_layers[comp]
        if merge_lora:
            for name in names:
                weights.update(_merged_base(name, tuners[name]))
            note = "LoRA merged into the base weights of its layers"
        else:
            merged = [n for n in names if getattr(tuners[n], "merged", False)]
            if merged:
                raise VlmkitError(
                    f"cannot export the adapters separately: the LoRA adapters of '{merged[0]}' are merged into the "
                    "model's weights; unmerge them or export with merge_lora=True"
                )
            adapter_configs[comp] = _lora_config(comp, names, tuners)
            adapter_weights.update({k: _cpu(v) for k, v in adapters.items() if k.startswith(f"{comp}.")})
            note = f"LoRA adapters in {ADAPTERS_FILE}"
        lora_notes[comp] = note

    tokenizer = getattr(model.decoder, "tokenizer", None)
    if not hasattr(tokenizer, "save_pretrained"):
        tokenizer = None
    files: dict[str, Any] = {
        MODEL_FILE: {
            "contains": "the weights of the parts the recipe's stages train, by their names in the model"
            + (" (LoRA adapters merged into the base weights)" if merge_lora and lora_comps else ""),
            "keys": sorted(weights),
            "dtypes": _dtype_counts(weights),
        }
    }
    if adapter_weights:
        files[ADAPTERS_FILE] = {
            "contains": f"the LoRA adapter weights of {', '.join(adapter_configs)}, by their names in the model; "
            f"{ADAPTERS_CONFIG} holds the config that re-injects them",
            "keys": sorted(adapter_weights),
            "dtypes": _dtype_counts(adapter_weights),
        }
    new_ids = list(getattr(model.decoder, "new_token_ids", []))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vlmkit_version": vlmkit.__version__,
        "torch_version": torch.__version__,
        "recipe": recipe.name,
        "merge_lora": merge_lora,
        "components": {c: _describe(sel, c, lora_notes.get(c)) for c in COMPONENTS},
        "files": files,
        "tokenizer": None if tokenizer is None else {"folder": TOKENIZER_DIR, "size": len(tokenizer), "new_token_ids": new_ids},
    }
    try:
        with atomic_dir(out_dir, owned=EXPORT_FILES, last=EXPORT_JSON) as tmp:
            (tmp / RECIPE_FILE).write_text(resolved.to_yaml(), encoding="utf-8")
            save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "vlmkit_export": FORMAT})
            if adapter_weights:
                save_file(adapter_weights, str(tmp / ADAPTERS_FILE), metadata={"format": "pt", "vlmkit_export": FORMAT})
                adapters_meta = {"format_version": FORMAT_VERSION, "peft_version": _version("peft"), "components": adapter_configs}
                (tmp / ADAPTERS_CONFIG).write_text(json.dumps(adapters_meta, indent=2) + "\n", encoding="utf-8")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only folder: nothing half-written stays
        raise VlmkitError(f"cannot write the export {out_dir}: {exc}; free space there and run the same command "
                          "again (a finished run's checkpoints are kept, so it only exports)") from None
    return out_dir


# ------------------------------------------------------------------------------ load
def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VlmkitError(f"'{folder}' is not a complete vlmkit export: {path.name} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmkitError(f"'{path}': cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise VlmkitError(f"'{path}': expected a JSON object, got a {type(data).__name__}")
    return data


def _listed_keys(meta: dict[str, Any], file: str, meta_path: Path) -> list[str] | None:
    entry = (meta.get("files") or {}).get(file) if isinstance(meta.get("files"), dict) else None
    if entry is None:
        return None
    keys = entry.get("keys") if isinstance(entry, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise VlmkitError(f"'{meta_path}': files.{file}.keys must be a list of weight names")
    return keys


def _load_weights(
    path: Path, target: nn.Module, folder: Path, listed: list[str] | None, complete: set[str] | None = None
) -> None:
    """Load the safetensors file ``path`` into ``target``: every key must be one of ``target``'s with
    the same shape, every ``listed`` key must be in the file, and (``complete``) every key of that set
    must be in the file."""
    if not path.is_file():
        raise VlmkitError(f"'{folder}' is not a complete vlmkit export: {path.name} is missing")
    state = target.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            for key in keys:
                if key not in state:
                    raise VlmkitError(
                        f"'{path}': weight '{key}' does not exist in the model rebuilt from {folder / RECIPE_FILE}; "
                        "the export does not belong to this recipe (or the file was changed)"
                    )
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(state[key].shape):
                    raise VlmkitError(
                        f"'{path}': weight '{key}' has shape {list(shape)} but the model rebuilt from "
                        f"{folder / RECIPE_FILE} has {list(state[key].shape)} there"
                    )
            for key in keys:
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise VlmkitError(f"'{path}': cannot read it as safetensors: {exc}") from None
    missing = [k for k in (listed or []) if k not in tensors]
    if complete is not None:
        missing += sorted(k for k in complete if k not in tensors and k not in missing)
    if missing:
        raise VlmkitError(f"'{path}': weight '{missing[0]}' is missing ({len(missing)} missing in all)")
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor)


def _inject_adapters(model: nn.Module, configs: Any, config_path: Path) -> None:
    from peft import inject_adapter_in_model

    from vlmkit.core.tuning import lora_config

    if not isinstance(configs, dict) or not configs:
        raise VlmkitError(f"'{config_path}': 'components' must map component names to LoRA configs")
    for comp, cfg in configs.items():
        if comp not in COMPONENTS:
            raise VlmkitError(f"'{config_path}': '{comp}' is not a component; expected one of {', '.join(COMPONENTS)}")
        try:
            config = lora_config(cfg)
            inject_adapter_in_model(config, getattr(model, comp), adapter_name=str(cfg.get("adapter_name", "default")))
        except (KeyError, TypeError, ValueError) as exc:
            raise VlmkitError(f"'{config_path}': components.{comp}: cannot re-inject the LoRA adapters: {exc}") from None


def load(
    path: str | Path, *, device: str | torch.device | None = None, registry: Any = None, trust_remote_code: bool = False,
) -> nn.Module:
    """Rebuild the model of an export folder (see :func:`export_model`) with its trained weights, in
    eval mode, on ``device`` (default: CPU). The backbones its recipe names must be reachable. Each
    component has the dtype its recipe names (the exported fp32 weights are cast to it).

    ``trust_remote_code``: an export whose recipe sets ``trust_remote_code: true`` somewhere (a
    ``pretrained`` folder or hub model that ships its own Python code) is loaded only when the caller
    passes ``trust_remote_code=True``; the export's own setting is never consent. Without it such an
    export is an error naming the field, before anything is loaded or run."""
    return load_with_recipe(path, device=device, registry=registry, trust_remote_code=trust_remote_code)[0]


def remote_code_requests(resolved: Any) -> list[str]:
    """The recipe fields of ``resolved`` that ask for ``trust_remote_code`` (``model.decoder.trust_remote_code``
    and the like), each with the source it would run code from when the config names one."""
    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}"
                if key == "trust_remote_code" and item is True:
                    sources = [f"{k}: {value[k]}" for k in ("pretrained", "tokenizer", "checkpoint", "model_name")
                               if isinstance(value.get(k), str)]
                    found.append(f"{path}: true" + (f" ({', '.join(sources)})" if sources else ""))
                else:
                    walk(item, path)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    for kind, spec in resolved.components.items():
        walk(spec.config.model_dump(), f"model.{kind}")
    for alias, spec in resolved.datasets.items():
        walk(spec.config.model_dump(), f"data.{alias}")
    for alias, spec in resolved.templates.items():
        walk(spec.config.model_dump(), f"data.{alias}.template")
    for i, spec in enumerate(resolved.evaluators):
        walk(spec.config.model_dump(), f"eval[{i}]")
    return found


#: the recipe sections ``load_with_recipe`` may override: where data is read and how it is evaluated
OVERRIDABLE = ("data", "eval")


def find_export(path: str | Path) -> Path:
    """An export folder, or a run folder's ``export/``."""
    folder = Path(path).expanduser()
    if (folder / EXPORT_JSON).is_file() or not (folder / "export").is_dir():
        return folder
    return folder / "export"


def load_with_recipe(
    path: str | Path, *, device: str | torch.device | None = None, registry: Any = None, overrides: list[str] = (),
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """:func:`load`, and the export's resolved recipe. ``path``: an export folder or a run folder
    (its ``export/``). ``overrides``: ``--set`` style changes of the recipe's ``data`` and ``eval``
    sections (e.g. to evaluate on other files); the model's own sections cannot change.
    ``trust_remote_code``: the caller's consent to run the code an export's recipe asks for (see
    :func:`load`)."""
    from vlmkit.core.compose import build_model
    from vlmkit.core.recipe.loader import load_recipe
    from vlmkit.core.recipe.merge import parse_override

    folder = find_export(path)
    if not folder.exists():
        raise VlmkitError(f"'{folder}': no such export folder")
    if not folder.is_dir():
        raise VlmkitError(f"'{folder}' is not a folder; an export is a folder with {RECIPE_FILE}, {MODEL_FILE} and {EXPORT_JSON}")
    recipe_path = folder / RECIPE_FILE
    if not recipe_path.is_file():
        raise VlmkitError(f"'{folder}' is not a complete vlmkit export: {RECIPE_FILE} is missing")
    meta_path = folder / EXPORT_JSON
    meta = _read_json(meta_path, folder)
    if meta.get("format") != FORMAT:
        raise VlmkitError(f"'{meta_path}': not a vlmkit export (format is {meta.get('format')!r}, expected '{FORMAT}')")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise VlmkitError(
            f"'{meta_path}': export format version {version!r} is not supported by this vlmkit (reads up to {FORMAT_VERSION})"
        )
    model_listed = _listed_keys(meta, MODEL_FILE, meta_path)
    if model_listed is None:
        raise VlmkitError(f"'{meta_path}': files.{MODEL_FILE} is missing; the export is incomplete")
    adapters_listed = _listed_keys(meta, ADAPTERS_FILE, meta_path)

    for text in overrides:
        parts, _ = parse_override(text)
        if parts[0] not in OVERRIDABLE:
            raise VlmkitError(f"--set {text}: only the recipe's {' and '.join(OVERRIDABLE)} sections can change for an "
                              f"exported model (its model and training are fixed by {recipe_path})")
    # the export's resolved recipe, read like any recipe file (no profile), the --set changes applied by the loader
    resolved = load_recipe(recipe_path, overrides=list(overrides), registry=registry, bare=True)
    requests = remote_code_requests(resolved)
    if requests and trust_remote_code is not True:
        raise VlmkitError(
            f"'{recipe_path}' asks to run Python code shipped with the model ({'; '.join(requests)}); vlmkit never "
            "runs an export's code on the export's own say-so. Read that code first; to allow it, pass "
            "--trust-remote-code (recipes eval / chat) or trust_remote_code=True (vlmkit.load)"
        )
    model = build_model(resolved, registry)
    tok_meta = meta.get("tokenizer")
    if isinstance(tok_meta, dict) and isinstance(tok_meta.get("size"), int):
        size = len(model.decoder.tokenizer)
        if size != tok_meta["size"]:
            raise VlmkitError(
                f"'{folder}': the tokenizer rebuilt from {RECIPE_FILE} has {size} tokens but the exported one had "
                f"{tok_meta['size']}; the decoder's tokenizer changed since the export"
            )
    _load_weights(folder / MODEL_FILE, model, folder, model_listed)
    if adapters_listed is not None:
        config_path = folder / ADAPTERS_CONFIG
        adapters_meta = _read_json(config_path, folder)
        _inject_adapters(model, adapters_meta.get("components"), config_path)
        _, injected = _split_state(model, _tuner_layers(model))
        _load_weights(folder / ADAPTERS_FILE, model, folder, adapters_listed, complete=set(injected))
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    model.eval()
    return model, resolved
