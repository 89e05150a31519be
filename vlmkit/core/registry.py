"""The component registry: a pluggy host that collects components from plug-ins.

Built-in components (listed in ``vlmkit/registry.yaml``) are registered by the built-in plug-in
through the same hooks as third-party plug-ins, which are found through the entry-point group
``vlmkit``. Each plug-in is loaded and called on its own: one that fails is reported (a warning
naming its distribution) and everything else keeps working, unless strict mode makes it fatal.

Environment:
    ``VLMKIT_STRICT_PLUGINS=1``  a plug-in failure is an error; pluggy's ``check_pending()`` runs.
    ``VLMKIT_PLUGINS=a,b``      load only these third-party plug-ins (entry-point or distribution names).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy
from pydantic import BaseModel

from vlmkit.core.errors import DuplicateComponentError, PluginError, VlmkitError, listing, suggest
from vlmkit.core.hookspecs import (
    HOOK_FOR_KIND,
    HOOK_FOR_RECIPE_EXTENSION,
    KINDS,
    LOADER_PLACEHOLDERS,
    PROJECT,
    VlmkitHookSpecs,
)

ENTRY_POINT_GROUP = "vlmkit"
BUILTIN_PLUGIN = "vlmkit"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
_ALL_HOOKS = (*HOOK_FOR_KIND.values(), *HOOK_FOR_RECIPE_EXTENSION.values())
_PLACEHOLDER_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class PluginWarning(UserWarning):
    """A plug-in failed to load or register; its components are unavailable."""


@dataclass(frozen=True)
class Provider:
    """Who registered a component: a plug-in and the distribution that ships it."""

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.plugin == BUILTIN_PLUGIN and self.distribution == "vlmkit":
            return "vlmkit (built-in)"
        if self.plugin.startswith(BUILTIN_PLUGIN + ".") and self.distribution == "vlmkit":
            return f"{self.plugin} (built-in)"
        dist = f"distribution {self.distribution} {self.version or ''}".strip() if self.distribution else "no distribution"
        return f"plug-in '{self.plugin}' ({dist})"


@dataclass
class ComponentEntry:
    kind: str
    name: str
    target: Any  # a class, or a "module:object" string resolved on first use
    summary: str
    provider: Provider
    _cls: type | None = field(default=None, repr=False)

    @property
    def reference(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{self.target.__qualname__}"

    def load(self) -> type:
        """The component class, imported if registered by reference, checked against its interface."""
        if self._cls is None:
            target = _resolve(self.target, f"{self.kind} '{self.name}' from {self.provider.describe()}")
            try:
                check_component_class(self.kind, self.name, target)
            except PluginError as exc:
                raise PluginError(f"{exc} (registered as '{self.target}' by {self.provider.describe()})") from exc
            self._cls = target
        return self._cls

    @property
    def config_class(self) -> type[BaseModel]:
        return self.load().Config


def _resolve(target: Any, registered: str) -> Any:
    """``target`` itself, or the object a ``"module:object"`` string names, imported now; an import
    failure is a :class:`PluginError` naming what was ``registered`` (e.g. "encoder 'x' from <provider>")."""
    if not isinstance(target, str):
        return target
    try:
        return import_object(target)
    except Exception as exc:  # noqa: BLE001 - any import failure is the provider's
        raise PluginError(f"{registered} could not be imported from '{target}': {type(exc).__name__}: {exc}") from exc


@dataclass
class ExtensionEntry:
    """A recipe placeholder or recipe check a plug-in registered (``what``: "placeholder" or "check")."""

    what: str
    name: str
    target: Any  # a callable, or a "module:function" string resolved on first use
    summary: str
    provider: Provider
    _fn: Callable[..., Any] | None = field(default=None, repr=False)

    def load(self) -> Callable[..., Any]:
        """The function, imported if registered by reference."""
        if self._fn is None:
            target = _resolve(self.target, f"recipe {self.what} '{self.name}' from {self.provider.describe()}")
            if not callable(target):
                raise PluginError(f"recipe {self.what} '{self.name}' from {self.provider.describe()}: {target!r} is not callable")
            self._fn = target
        return self._fn


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    status: str  # "loaded" | "failed" | "skipped"
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "hooks": self.hooks,
            "components": [{"kind": k, "name": n} for k, n in self.components],
        }


def import_object(ref: str) -> Any:
    """``"package.module:Object"`` -> the object."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"'{ref}' is not of the form 'module:object'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_component_class(kind: str, name: str, cls: Any) -> None:
    from vlmkit.core.interfaces import INTERFACES  # torch is imported only when a class is checked

    interface = INTERFACES[kind]
    if not (inspect.isclass(cls) and issubclass(cls, interface)):
        raise PluginError(f"{kind} '{name}': {cls!r} is not a subclass of {interface.__module__}.{interface.__name__}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(f"{kind} '{name}': {cls.__qualname__} does not implement {missing}")
    config = getattr(cls, "Config", None)
    if not (inspect.isclass(config) and issubclass(config, BaseModel)):
        raise PluginError(f"{kind} '{name}': {cls.__qualname__}.Config must be a pydantic model")
    if config.model_config.get("extra") != "forbid":
        raise PluginError(
            f"{kind} '{name}': {cls.__qualname__}.Config must forbid unknown keys "
            "(subclass vlmkit.core.interfaces.ComponentConfig)"
        )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class Registry:
    """Every component kind -> name -> :class:`ComponentEntry`, collected from the plug-ins.

    ``strict`` and ``allow`` default to the environment (``VLMKIT_STRICT_PLUGINS``,
    ``VLMKIT_PLUGINS``). ``plugins`` adds ``(name, object)`` plug-ins directly (tests, notebooks).
    ``component_list``: the component list the built-in plug-in reads (``registry.yaml``'s schema;
    default: the packaged ``vlmkit/registry.yaml``).

    Besides ``components``, plug-ins fill ``placeholders`` (name -> :class:`ExtensionEntry`, the
    ``${name}`` a recipe may use) and ``checks`` (name -> :class:`ExtensionEntry`, cross-field
    recipe checks).
    """

    def __init__(
        self,
        *,
        strict: bool | None = None,
        allow: list[str] | None = None,
        entry_points: bool = True,
        builtins: bool = True,
        plugins: list[tuple[str, Any]] = (),
        component_list: str | os.PathLike | None = None,
    ):
        self.strict = _env_flag("VLMKIT_STRICT_PLUGINS") if strict is None else strict
        if allow is None and os.environ.get("VLMKIT_PLUGINS", "").strip():
            allow = [a.strip() for a in os.environ["VLMKIT_PLUGINS"].split(",") if a.strip()]
        self.allow = allow
        self.components: dict[str, dict[str, ComponentEntry]] = {k: {} for k in KINDS}
        self.placeholders: dict[str, ExtensionEntry] = {}
        self.checks: dict[str, ExtensionEntry] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self._providers: dict[str, Provider] = {}
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(VlmkitHookSpecs)

        if builtins:
            self._add_builtins(component_list)
        if entry_points:
            self._load_entry_points()
        for name, obj in plugins:
            self._add_plugin(name, obj, None, None)
        if self.strict:
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                provider = self._providers.get(self.pm.get_name(exc.plugin) or "")
                who = f" {provider.describe()}:" if provider else ""
                raise PluginError(f"strict plug-in check failed:{who} {exc}") from exc
        else:
            self._warn_unknown_hooks()
        self._collect()

    def _warn_unknown_hooks(self) -> None:
        """A hook implementation whose name is no vlmkit hook (a typo such as ``register_encodrs``)
        would never be called: say so (strict mode makes it an error through ``check_pending``)."""
        known = set(vars(VlmkitHookSpecs))
        for name in sorted(vars(self.pm.hook)):
            caller = getattr(self.pm.hook, name)
            if name.startswith("_") or name in known or not isinstance(caller, pluggy.HookCaller):
                continue
            for impl in caller.get_hookimpls():
                provider = self._providers.get(impl.plugin_name)
                who = provider.describe() if provider else f"plug-in '{impl.plugin_name}'"
                warnings.warn(
                    f"{who} implements '{name}', which is not a vlmkit hook{suggest(name, _ALL_HOOKS)} "
                    f"it is never called; hooks: {', '.join(_ALL_HOOKS)}",
                    PluginWarning,
                    stacklevel=3,
                )

    # ------------------------------------------------------------------ loading
    def _add_builtins(self, component_list: str | os.PathLike | None) -> None:
        """vlmkit's own plug-in (the listed components), then the in-tree plug-in modules the list
        names, each loaded as an entry point's module would be."""
        from vlmkit.core.builtins import ListedComponents, read_registry_file

        listed = read_registry_file(component_list)
        version = _dist_version("vlmkit")
        self._add_plugin(BUILTIN_PLUGIN, ListedComponents(listed.components), "vlmkit", version)
        for plugin in listed.plugins:
            try:
                module = importlib.import_module(plugin.module)
            except Exception as exc:  # noqa: BLE001 - reported like any plug-in that fails to import
                self._fail(PluginInfo(plugin.name, "vlmkit", version, "failed"), f"failed to import '{plugin.module}'", exc)
                continue
            self._add_plugin(plugin.name, module, "vlmkit", version)

    def _load_entry_points(self) -> None:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if self.allow is not None and ep.name not in self.allow and dist not in self.allow:
                self.plugins[ep.name] = PluginInfo(ep.name, dist, version, "skipped", "not in VLMKIT_PLUGINS")
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the host
                self._fail(PluginInfo(ep.name, dist, version, "failed"), f"failed to import '{ep.value}'", exc)
                continue
            self._add_plugin(ep.name, obj, dist, version)

    def _add_plugin(self, name: str, obj: Any, dist: str | None, version: str | None) -> None:
        info = PluginInfo(name, dist, version, "loaded")
        if name in self.plugins and self.plugins[name].status == "loaded":
            other = self.plugins[name]
            raise PluginError(
                f"two plug-ins are named '{name}': from {other.distribution or 'no distribution'} and from "
                f"{dist or 'no distribution'}; uninstall one or restrict with VLMKIT_PLUGINS"
            )
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001
            self._fail(info, "failed to register its hooks", exc)
            return
        info.hooks = sorted({impl_name for impl_name in _hook_names(self.pm, obj)})
        self.plugins[name] = info
        self._providers[name] = Provider(name, dist, version)

    def _fail(self, info: PluginInfo, what: str, exc: BaseException) -> None:
        info.status = "failed"
        info.error = f"{what}: {type(exc).__name__}: {exc}"
        self.plugins[info.name] = info
        dist = f"distribution {info.distribution} {info.version or ''}".strip() if info.distribution else "no distribution"
        message = f"plug-in '{info.name}' ({dist}) {info.error}"
        if self.strict:
            raise PluginError(message + " (strict plug-in mode: VLMKIT_STRICT_PLUGINS / --strict-plugins)") from exc
        warnings.warn(
            message + "; its components are unavailable (set VLMKIT_STRICT_PLUGINS=1 to make this an error)",
            PluginWarning,
            stacklevel=3,
        )

    def _collect(self) -> None:
        for kind in KINDS:
            caller = getattr(self.pm.hook, HOOK_FOR_KIND[kind])
            for impl in caller.get_hookimpls():  # registration order (pluggy *calls* them in reverse)
                plugin = impl.plugin_name
                if self.plugins.get(plugin) is None or self.plugins[plugin].status != "loaded":
                    continue
                provider = self._providers[plugin]
                register = self._register_callback(kind, provider)
                kwargs = {"register": register} if "register" in impl.argnames else {}
                try:
                    impl.function(**kwargs)
                except DuplicateComponentError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    self._drop(plugin)
                    self._fail(self.plugins[plugin], f"failed in {HOOK_FOR_KIND[kind]}", exc)
        for what, hook in HOOK_FOR_RECIPE_EXTENSION.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                plugin = impl.plugin_name
                if self.plugins.get(plugin) is None or self.plugins[plugin].status != "loaded":
                    continue
                register = self._extension_callback(what, self._providers[plugin])
                kwargs = {"register": register} if "register" in impl.argnames else {}
                try:
                    impl.function(**kwargs)
                except DuplicateComponentError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    self._drop(plugin)
                    self._fail(self.plugins[plugin], f"failed in {hook}", exc)

    def _drop(self, plugin: str) -> None:
        for kind in KINDS:
            for name in [n for n, e in self.components[kind].items() if e.provider.plugin == plugin]:
                del self.components[kind][name]
        for table in (self.placeholders, self.checks):
            for name in [n for n, e in table.items() if e.provider.plugin == plugin]:
                del table[name]
        self.plugins[plugin].components = []

    def _extension_callback(self, what: str, provider: Provider) -> Callable[..., None]:
        table = self.placeholders if what == "placeholder" else self.checks

        def register(name: str, function: Any, summary: str | None = None) -> None:
            pattern = _PLACEHOLDER_NAME_RE if what == "placeholder" else _NAME_RE
            if not isinstance(name, str) or not pattern.match(name):
                allowed = "letters, digits and '_'" if what == "placeholder" else "letters, digits, '_', '-', '.'"
                raise PluginError(f"recipe {what} name {name!r} must start with a letter and use {allowed}")
            if what == "placeholder" and name in LOADER_PLACEHOLDERS:
                raise PluginError(f"recipe placeholder '{name}' is the recipe loader's own (taken: {', '.join(LOADER_PLACEHOLDERS)})")
            if isinstance(function, str):
                if ":" not in function:
                    raise PluginError(f"recipe {what} '{name}': reference {function!r} is not of the form 'module:function'")
            elif not callable(function):
                raise PluginError(f"recipe {what} '{name}': {function!r} is not callable")
            existing = table.get(name)
            if existing is not None:
                raise DuplicateComponentError(
                    f"recipe {what} '{name}' is registered twice: by {existing.provider.describe()} and by "
                    f"{provider.describe()}; uninstall one of them or leave one out with VLMKIT_PLUGINS"
                )
            if summary is None:
                doc = inspect.getdoc(function) if not isinstance(function, str) else None
                summary = doc.splitlines()[0] if doc else ""
            table[name] = ExtensionEntry(what, name, function, summary, provider)

        return register

    def _register_callback(self, kind: str, provider: Provider) -> Callable[..., None]:
        def register(name: str, component: Any, summary: str | None = None) -> None:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise PluginError(f"{kind} name {name!r} must start with a letter and use letters, digits, '_', '-', '.'")
            if isinstance(component, str):
                if ":" not in component:
                    raise PluginError(f"{kind} '{name}': reference {component!r} is not of the form 'module:object'")
            else:
                check_component_class(kind, name, component)
            existing = self.components[kind].get(name)
            if existing is not None:
                raise DuplicateComponentError(
                    f"{kind} '{name}' is registered twice: by {existing.provider.describe()} and by "
                    f"{provider.describe()}; uninstall one of them or leave one out with VLMKIT_PLUGINS"
                )
            if summary is None:
                doc = inspect.getdoc(component) if not isinstance(component, str) else None
                summary = doc.splitlines()[0] if doc else ""
            self.components[kind][name] = ComponentEntry(kind, name, component, summary, provider)
            self.plugins[provider.plugin].components.append((kind, name))

        return register

    # ------------------------------------------------------------------ queries
    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def entry(self, kind: str, name: str) -> ComponentEntry:
        try:
            return self.components[kind][name]
        except KeyError:
            raise VlmkitError(
                f"unknown {kind} '{name}'{suggest(name, self.components[kind])} available: {listing(self.components[kind])}"
            ) from None

    def component_class(self, kind: str, name: str) -> type:
        return self.entry(kind, name).load()

    def placeholder_names(self) -> list[str]:
        """The ``${name}`` placeholders plug-ins provide, sorted."""
        return sorted(self.placeholders)

    def plugin_report(self) -> list[dict[str, Any]]:
        return [info.as_dict() for info in self.plugins.values()]


def _hook_names(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    return [caller.name for caller in (pm.get_hookcallers(plugin) or [])]


def _dist_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


_DEFAULT: Registry | None = None


def get_registry(*, refresh: bool = False, strict: bool | None = None) -> Registry:
    """The process-wide registry (built on first use from the environment's settings).
    ``strict=True`` (the CLI's ``--strict-plugins``): a strict registry, built anew unless the
    current one is strict already; it then serves later calls."""
    global _DEFAULT
    if _DEFAULT is None or refresh or (strict is True and not _DEFAULT.strict):
        _DEFAULT = Registry(strict=strict)
    return _DEFAULT

