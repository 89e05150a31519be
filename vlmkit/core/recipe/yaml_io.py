"""YAML reading that refuses duplicate keys (PyYAML silently keeps the last one), knows the
``!replace`` tag of the merge (:mod:`vlmkit.core.recipe.merge`) and reports syntax errors with
their line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vlmkit.core.errors import RecipeError, suggest
from vlmkit.core.recipe.merge import REPLACE_TAG, ReplaceList, ReplaceMapping


class RecipeLoader(yaml.SafeLoader):
    """A safe loader: no duplicate keys, and ``!replace`` on a mapping or a list."""


def _construct_mapping(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key '{key}'", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


def _construct_replace(loader: RecipeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return ReplaceMapping(_construct_mapping(loader, node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return ReplaceList(loader.construct_sequence(node, deep=True))
    raise yaml.constructor.ConstructorError(
        None, None,
        f"{REPLACE_TAG} marks a mapping or a list that replaces the layer below instead of merging with it "
        f"(e.g. {REPLACE_TAG} {{}} clears a mapping); a plain value is always replaced, so it needs no tag",
        node.start_mark,
    )


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
RecipeLoader.add_constructor(REPLACE_TAG, _construct_replace)


def _unknown_tag(loader: RecipeLoader, suffix: str, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"unknown tag '{node.tag}'{suggest(node.tag, [REPLACE_TAG])} the only tag recipes know is {REPLACE_TAG}",
        node.start_mark,
    )


RecipeLoader.add_multi_constructor("!", _unknown_tag)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    return parse_yaml_mapping(text, str(path))


def parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise RecipeError(source, [f"{where}invalid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(source, [f"invalid YAML: {exc}"]) from None
    if data is None:
        raise RecipeError(source, ["the file is empty; a recipe is a mapping with name, model, data and stages"])
    if not isinstance(data, dict):
        raise RecipeError(source, [f"a recipe must be a mapping of fields, got a {type(data).__name__}"])
    return data


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
