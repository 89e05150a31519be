"""The built-in plug-in: registers the components listed in ``vlmkit/registry.yaml`` through the
same hooks a third-party plug-in implements. Components are registered by ``module:object``
reference and imported on first use."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from vlmkit.core.hookspecs import hookimpl


class BuiltinComponent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["encoder", "connector", "fusion", "decoder", "dataset", "template", "evaluator", "llm_backend"]
    object: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    summary: str


class BuiltinRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    components: list[BuiltinComponent]


@lru_cache(maxsize=1)
def builtin_components() -> tuple[BuiltinComponent, ...]:
    text = resources.files("vlmkit").joinpath("registry.yaml").read_text(encoding="utf-8")
    return tuple(BuiltinRegistry.model_validate(yaml.safe_load(text)).components)


def _register(kind: str, register) -> None:
    for comp in builtin_components():
        if comp.kind == kind:
            register(comp.name, comp.object, summary=comp.summary)


@hookimpl
def register_encoders(register):
    _register("encoder", register)


@hookimpl
def register_connectors(register):
    _register("connector", register)


@hookimpl
def register_fusions(register):
    _register("fusion", register)


@hookimpl
def register_decoders(register):
    _register("decoder", register)


@hookimpl
def register_datasets(register):
    _register("dataset", register)


@hookimpl
def register_templates(register):
    _register("template", register)


@hookimpl
def register_evaluators(register):
    _register("evaluator", register)


@hookimpl
def register_llm_backends(register):
    _register("llm_backend", register)
