"""Deep merging of recipe layers (``extends`` parents, profiles) and ``--set`` overrides.

Rules:
- mappings merge key by key, recursively;
- a mapping that names its component (``name``) or dataset type (``type``) differently from the
  layer below, or names it where the layer below did not, is replaced whole: swapping
  ``connector: {name: mlp}`` over a perceiver drops the perceiver's options, and an ablation's
  profile that names its connector is not mixed with its parent profile's options for another one;
- lists of mappings that all have a ``name`` (stages) merge entry by entry by name, new names appended;
- any other value (lists included) is replaced.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from vlmkit.core.errors import VlmkitError

_IDENTITY_KEYS = ("name", "type")


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def deep_merge(base: Any, over: Any) -> Any:
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
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
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
