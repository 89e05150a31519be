"""The recipe JSON Schema for editors: the schema models with every component section spelled out
as a choice of the registered components (``name`` as the discriminator) and their options."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, create_model

from vlmkit.core.errors import PluginError
from vlmkit.core.recipe.schema import COMPONENTS, Recipe, Strict


def _choices(registry: Any, kind: str, key: str) -> Any:
    members = []
    for name in registry.names(kind):
        try:
            config_cls = registry.entry(kind, name).config_class
        except PluginError as exc:
            warnings.warn(f"schema: {kind} '{name}' left out: {exc}", stacklevel=2)
            continue
        fields: dict[str, Any] = {key: (Literal[name], Field(description=registry.components[kind][name].summary))}
        members.append(create_model(f"{kind}_{name}".replace("-", "_").replace(".", "_"), __base__=config_cls, **fields))
    if not members:
        return dict[str, Any]
    if len(members) == 1:
        return members[0]
    return Union[tuple(members)]  # noqa: UP007 - built dynamically


def recipe_json_schema(registry: Any) -> dict[str, Any]:
    model_fields = {kind: (_choices(registry, kind, "name"), ...) for kind in COMPONENTS}
    model_spec = create_model("ModelSpec", __base__=Strict, **model_fields)
    dataset = _choices(registry, "dataset", "type")
    schema_model: type[BaseModel] = create_model(
        "Recipe",
        __base__=Recipe,
        model=(model_spec, ...),
        data=(dict[str, dataset], Field(min_length=1)),
    )
    schema = schema_model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "vlmkit recipe"
    return schema



