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
- lists of mappings that all have a ``name`` (stages) merge entry by entry by name, new names appended;
- any other value (lists included) is replaced;
- a mapping or list tagged ``!replace`` replaces the value below it whole instead of merging:
  ``lr_per_component: !replace {}`` clears the per-component learning rates of the layers below,
  ``lr_per_component: !replace {connector: 2.0e-5}`` leaves only that one, ``stages: !replace [...]``
  drops the stages below. The tag keeps its meaning through later merges (a profile's
  ``!replace`` also clears what the recipe itself sets under a parent's profile of the same name)
  and is gone from the resolved recipe. It applies to mappings and lists only (``!replace 3`` is
  an error: a plain value is always replaced);
- ``--set PATH=VALUE`` always replaces the value at ``PATH`` (``--set stages.instruct.lr_per_component={}``
  clears it); ``!replace`` is accepted there and changes nothing.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from vlmkit.core.errors import VlmkitError

_IDENTITY_KEYS = ("name", "type")

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


def deep_merge(base: Any, over: Any) -> Any:
    if _replacing(over):
        return copy.deepcopy(over)  # keeps its marker: it replaces again when merged over later
    if isinstance(base, dict) and isinstance(over, dict):
        for key in _IDENTITY_KEYS:
            if key in over and base.get(key) != over[key]:
                return copy.deepcopy(over)
        merged = copy.deepcopy(base)
        for key, value in over.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if _named_list(base) and _named_list(over):
        merged_list = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(merged_list)}
        for item in over:
            if item["name"] in index:
                merged_list[index[item["name"]]] = deep_merge(merged_list[index[item["name"]]], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(over)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.connector.num_latents=32"`` -> (path, value); the value is read as YAML."""
    path_text, sep, value_text = text.partition("=")
    path = [p for p in path_text.strip().split(".")]
    if not sep or not path_text.strip() or any(not p for p in path):
        raise VlmkitError(f"--set '{text}': expected PATH=VALUE with a dotted path, e.g. model.connector.num_latents=32")
    from vlmkit.core.recipe.yaml_io import RecipeLoader

    try:
        value = plain(yaml.load(value_text, Loader=RecipeLoader)) if value_text.strip() else ""  # noqa: S506
    except yaml.YAMLError as exc:
        raise VlmkitError(f"--set '{text}': the value is not valid YAML: {exc}") from None
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
                node[key] = value
            else:
                if key not in node or node[key] is None:
                    node[key] = {}
                node = node[key]
        else:
            parent = ".".join(path[:depth])
            raise VlmkitError(f"--set '{text}': {parent} is a {type(node).__name__} value, not a section; cannot set {where}")


def _list_index(node: list[Any], key: str) -> int | None:
    if key.lstrip("-").isdigit():
        idx = int(key)
        return idx if -len(node) <= idx < len(node) else None
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    return None
