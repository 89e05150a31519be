"""The built-in plug-in: the components listed in ``vlmkit/registry.yaml``, registered through the
same hooks a third-party plug-in implements, by one generic implementation (:meth:`ListedComponents.register_kind`)
behind every ``register_<kind>s`` hook. Components are registered by ``module:object`` reference
and imported on first use.

``registry.yaml`` is the one list of built-ins: adding an in-tree component is its module, one entry
there and its tests. Its ``plugins`` section names the in-tree plug-in modules that implement other
hooks (recipe placeholders, recipe checks: :mod:`vlmkit.demo.plugin`, :mod:`vlmkit.lcl.plugin`);
the registry loads them after the components, as it loads third-party plug-ins."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmkit.core.errors import PluginError
from vlmkit.core.hookspecs import HOOK_FOR_KIND, hookimpl


class BuiltinComponent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["encoder", "connector", "fusion", "decoder", "dataset", "template", "evaluator", "llm_backend"]
    object: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    summary: str


class BuiltinPlugin(BaseModel):
    """An in-tree plug-in module (hooks other than components), loaded like a third-party one."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^vlmkit\.[\w.]+$")
    module: str = Field(pattern=r"^[\w.]+$")


class BuiltinRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    components: list[BuiltinComponent]
    plugins: list[BuiltinPlugin] = []


def read_registry_file(path: Path | None = None) -> BuiltinRegistry:
    """``registry.yaml`` (the packaged one unless ``path``), validated."""
    if path is None:
        text = resources.files("vlmkit").joinpath("registry.yaml").read_text(encoding="utf-8")
        where = "vlmkit/registry.yaml"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    try:
        return BuiltinRegistry.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        raise PluginError(f"{where}: not a valid component list: {exc}") from None


@lru_cache(maxsize=1)
def _packaged() -> BuiltinRegistry:
    return read_registry_file()


def builtin_components() -> tuple[BuiltinComponent, ...]:
    """The packaged ``registry.yaml``'s components, in file order."""
    return tuple(_packaged().components)


def builtin_plugins() -> tuple[BuiltinPlugin, ...]:
    """The packaged ``registry.yaml``'s in-tree plug-in modules, in file order."""
    return tuple(_packaged().plugins)


class ListedComponents:
    """A plug-in that registers the components of a component list (``registry.yaml``'s schema).
    Every ``register_<kind>s`` hook is the same method, :meth:`register_kind`, bound to its kind."""

    def __init__(self, components: tuple[BuiltinComponent, ...] | list[BuiltinComponent]):
        self.components = tuple(components)

    def register_kind(self, kind: str, register: Callable[..., None]) -> None:
        """Register this list's components of ``kind``, in list order."""
        for comp in self.components:
            if comp.kind == kind:
                register(comp.name, comp.object, summary=comp.summary)


def _hook_for(kind: str) -> Callable[..., None]:
    def hook(self: ListedComponents, register: Callable[..., None]) -> None:
        self.register_kind(kind, register)

    hook.__name__ = hook.__qualname__ = HOOK_FOR_KIND[kind]
    hook.__doc__ = f"Register the listed {kind}s."
    return hookimpl(hook)


for _kind, _hook_name in HOOK_FOR_KIND.items():
    setattr(ListedComponents, _hook_name, _hook_for(_kind))
del _kind, _hook_name


def builtin_plugin() -> ListedComponents:
    """vlmkit's own plug-in: the packaged ``registry.yaml``'s components."""
    return ListedComponents(builtin_components())
