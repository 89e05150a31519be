"""Deep merging of recipe layers (``extends`` parents, profiles) and ``--set`` overrides.

Layers, from the bottom: the ``extends`` parent (itself resolved the same way), the recipe, the
chosen profile (the parent's and the recipe's profile of that name, merged the same way), then
each ``--set`` in order.

Rules:
- mappings merge key by key, recursively;
- a mapping that names its component (``name``) or dataset type (``type``) differently from the
  layer below, or names it where the layer below did not, is replaced whole: swapping
  ``connector: {name: mlp}`` over a perceiver drops the perceiver's options, and an ablation's
  profile that names its connector is not mixed with its parent profile's options for another one;
- a swap is one line in every profile (:func:`drop_swapped_components`): a layer that changes the
  ``name`` of ``model.encoder`` / ``connector`` / ``fusion`` / ``decoder`` (or the ``type`` of a
  ``data`` entry) from what the layers below it resolved drops what those layers gave that section,
  the parent's profiles included, which a child recipe sits above (for component identity, the
  layers rank: parent body < parent profile < child body < child profile < ``--set``); options that
  a higher layer (the child's own profile) gives the new component apply;
- lists of mappings that all have a ``name`` (stages) merge entry by entry by name, new names appended
  (a ``name`` that is not a string is a :class:`RecipeError`);
- any other value (lists included) is replaced;
- a mapping or list tagged ``!replace`` replaces the value below it whole instead of merging:
  ``lr_per_component: !replace {}`` clears the per-component learning rates of the layers below,
  ``lr_per_component: !replace {connector: 2.0e-5}`` leaves only that one, ``stages: !replace [...]``
  drops the stages below. The tag keeps its meaning through later merges (a profile's
  ``!replace`` also clears what the recipe itself sets under a parent's profile of the same name)
  and is gone from the resolved recipe. It applies to mappings and lists only (``!replace 3`` is
  an error: a plain value is always replaced);
- ``--set PATH=VALUE`` always replaces the value at ``PATH`` (``--set stages.instruct.lr_per_component={}``
  clears it); ``!replace`` is accepted there and changes nothing. ``--set model.connector.name=qformer``
  (a component's ``name``, a dataset's ``type``) that changes it starts the section afresh: the old
  component's options are dropped, later ``--set``s add the new one's.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from vlmkit.core.errors import RecipeError, VlmkitError

_IDENTITY_KEYS = ("name", "type")

#: the model sections that hold one component each, identified by their ``name``
COMPONENT_SECTIONS = ("encoder", "connector", "fusion", "decoder")

#: the YAML tag that makes a mapping or list replace the layer below instead of merging with it
REPLACE_TAG = "!replace"


class ReplaceMapping(dict):
    """A mapping tagged ``!replace``: replaces the value below it whole."""


class ReplaceList(list):
    """A list tagged ``!replace``: replaces the value below it whole (even a list of stages)."""


def _replacing(value: Any) -> bool:
    return isinstance(value, (ReplaceMapping, ReplaceList))


def plain(value: Any) -> Any:
    """``value`` with every ``!replace`` marker turned back into a plain dict or list."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def check_entry_names(value: Any, source: str, loc: tuple[str, ...]) -> None:
    """Raise :class:`RecipeError` for an entry of a list of named mappings (``stages``) whose ``name``
    is not a string: entries merge by name, so a list or a number there cannot be matched."""
    if not isinstance(value, list):
        return
    for i, item in enumerate(value):
        if isinstance(item, dict) and "name" in item and not isinstance(item["name"], str):
            where = ".".join((*loc, str(i), "name"))
            raise RecipeError(
                source,
                [f"{where}: got {type(item['name']).__name__} {item['name']!r}; entries merge by name, so a name is one "
                 f"string: letters, digits, '_', '-' and '.', starting with a letter, e.g. 'align'"],
            )


def deep_merge(base: Any, over: Any, *, source: str = "recipe", loc: tuple[str, ...] = ()) -> Any:
    """``over`` merged over ``base`` by the rules above. ``source`` and ``loc`` (the path of ``base``
    in the recipe) name the file and field in the :class:`RecipeError` of a malformed entry."""
    if _replacing(over):
        return copy.deepcopy(over)  # keeps its marker: it replaces again when merged over later
    if isinstance(base, dict) and isinstance(over, dict):
        for key in _IDENTITY_KEYS:
            if key in over and base.get(key) != over[key]:
                return copy.deepcopy(over)
        merged = copy.deepcopy(base)
        for key, value in over.items():
            if key in base:
                merged[key] = deep_merge(base[key], value, source=source, loc=(*loc, str(key)))
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if _named_list(base) and _named_list(over):
        check_entry_names(base, source, loc)
        check_entry_names(over, source, loc)
        merged_list = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(merged_list)}
        for item in over:
            if item["name"] in index:
                where = (*loc, item["name"])
                merged_list[index[item["name"]]] = deep_merge(merged_list[index[item["name"]]], item, source=source, loc=where)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(over)


def _identity_sections(layer: Any) -> list[tuple[tuple[str, str], str]]:
    """``((section, key), identity key)`` of the sections of ``layer`` that name what they hold:
    ``model.<component>`` by ``name``, ``data.<alias>`` by ``type``."""
    found: list[tuple[tuple[str, str], str]] = []
    if not isinstance(layer, dict):
        return found
    model = layer.get("model")
    if isinstance(model, dict):
        found += [(("model", kind), "name") for kind in COMPONENT_SECTIONS if kind in model]
    data = layer.get("data")
    if isinstance(data, dict):
        found += [(("data", alias), "type") for alias in data]
    return found


def drop_swapped_components(layers: list[Any]) -> list[Any]:
    """The layers of a recipe, lowest first in the order that decides what each component *is*
    (parent body, parent profile, child body, child profile, ...), with the options that a swap
    makes obsolete removed: where a layer names a component (``model.<kind>.name``) or a dataset
    type (``data.<alias>.type``) other than the one the layers below it resolved, every lower
    layer's mapping for that section is dropped, so that only the swapping layer and those above it
    describe the new component. Returns new mappings; the input is not changed. Layers are then
    merged in the loader's order (bodies, then profiles) as before."""
    last_swap: dict[tuple[str, str], int] = {}
    current: dict[tuple[str, str], Any] = {}
    for i, layer in enumerate(layers):
        for section, key in _identity_sections(layer):
            value = layer[section[0]][section[1]]
            if not isinstance(value, dict) or key not in value:
                continue
            if section not in current or current[section] != value[key]:
                if section in current:
                    last_swap[section] = i
                current[section] = value[key]
            if _replacing(value):
                last_swap[section] = max(last_swap.get(section, 0), i)
    if not last_swap:
        return list(layers)
    result = []
    for i, layer in enumerate(layers):
        drop = [s for s, at in last_swap.items() if i < at and isinstance(layer, dict)
                and isinstance(layer.get(s[0]), dict) and s[1] in layer[s[0]]]
        if drop:
            layer = copy.copy(layer)
            for top, key in drop:
                section = copy.copy(layer[top])  # keeps a !replace marker's type
                del section[key]
                layer[top] = section
        result.append(layer)
    return result


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.connector.num_latents=32"`` -> (path, value); the value is read as YAML."""
    path_text, sep, value_text = text.partition("=")
    path = [p for p in path_text.strip().split(".")]
    if not sep or not path_text.strip() or any(not p for p in path):
        raise VlmkitError(f"--set '{text}': expected PATH=VALUE with a dotted path, e.g. model.connector.num_latents=32")
    from vlmkit.core.recipe.yaml_io import YAMLLimitError, load_yaml_value, yaml_problem

    try:
        value = plain(load_yaml_value(value_text)) if value_text.strip() else ""
    except (yaml.YAMLError, RecursionError) as exc:
        problem = yaml_problem(exc, value_text)
        what = "the value" if isinstance(exc, YAMLLimitError) else "the value is not valid YAML"
        raise VlmkitError(f"--set '{text}': {what}: {problem.replace('invalid YAML: ', '', 1)}") from None
    return path, value


def apply_override(data: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    """Set ``path`` in ``data``. List items are addressed by index (``stages.0.lr``) or, in lists of
    named entries, by name (``stages.align.lr``). Missing mappings are created (and then rejected by
    validation if the field does not exist, with its path)."""
    node: Any = data
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            idx = _list_index(node, key)
            if idx is None:
                names = [str(i) for i in range(len(node))] + [str(v["name"]) for v in node if isinstance(v, dict) and "name" in v]
                raise VlmkitError(f"--set '{text}': {where}: no list entry '{key}'; entries: {', '.join(names) or '(none)'}")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                if _starts_afresh(path, node, value):
                    # a swap: the old component's options do not describe the new one
                    for other in [k for k in node if k != key]:
                        del node[other]
                node[key] = value
            else:
                if key not in node or node[key] is None:
                    node[key] = {}
                node = node[key]
        else:
            parent = ".".join(path[:depth])
            raise VlmkitError(f"--set '{text}': {parent} is a {type(node).__name__} value, not a section; cannot set {where}")


def _starts_afresh(path: list[str], node: dict[str, Any], value: Any) -> bool:
    """Whether ``--set PATH=value`` swaps a component (``model.<kind>.name``) or a dataset's type
    (``data.<alias>.type``) for another one."""
    swaps = (len(path) == 3 and path[0] == "model" and path[1] in COMPONENT_SECTIONS and path[2] == "name") or (
        len(path) == 3 and path[0] == "data" and path[2] == "type"
    )
    return swaps and path[2] in node and node[path[2]] != value


def _list_index(node: list[Any], key: str) -> int | None:
    if key.lstrip("-").isdigit():
        idx = int(key)
        return idx if -len(node) <= idx < len(node) else None
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    return None
