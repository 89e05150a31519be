"""The plug-in contract: pluggy markers and the hooks a plug-in may implement.

A plug-in is any module or object with functions decorated by :data:`hookimpl`. Each hook
receives a ``register`` callback; a plug-in never touches the registry itself::

    from vlmkit import hookimpl

    @hookimpl
    def register_encoders(register):
        register("my_encoder", MyEncoder)                  # a class ...
        register("lazy_encoder", "my_pkg.big:BigEncoder")  # ... or a "module:object" string,
                                                           #     imported on first use

``register(name, component, summary=None)``: ``component`` is a subclass of the kind's interface
(:mod:`vlmkit.core.interfaces`) or a ``"module:object"`` reference to one; ``summary`` defaults
to the first line of the class docstring.
"""

from __future__ import annotations

import pluggy

PROJECT = "vlmkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class VlmkitHookSpecs:
    """One hook per component kind."""

    @hookspec
    def register_encoders(self, register):
        """Register vision encoders (:class:`vlmkit.core.interfaces.VisionEncoder`)."""

    @hookspec
    def register_connectors(self, register):
        """Register connectors (:class:`vlmkit.core.interfaces.Connector`)."""

    @hookspec
    def register_fusions(self, register):
        """Register fusions (:class:`vlmkit.core.interfaces.Fusion`)."""

    @hookspec
    def register_decoders(self, register):
        """Register language decoders (:class:`vlmkit.core.interfaces.LanguageDecoder`)."""

    @hookspec
    def register_datasets(self, register):
        """Register dataset types (:class:`vlmkit.core.interfaces.Dataset`)."""

    @hookspec
    def register_templates(self, register):
        """Register chat templates (:class:`vlmkit.core.interfaces.Template`)."""

    @hookspec
    def register_evaluators(self, register):
        """Register evaluators (:class:`vlmkit.core.interfaces.Evaluator`)."""

    @hookspec
    def register_llm_backends(self, register):
        """Register text LLM backends for data generation (:class:`vlmkit.llm_backends.base.LLMBackend`)."""


#: component kind -> hook name
HOOK_FOR_KIND = {
    "encoder": "register_encoders",
    "connector": "register_connectors",
    "fusion": "register_fusions",
    "decoder": "register_decoders",
    "dataset": "register_datasets",
    "template": "register_templates",
    "evaluator": "register_evaluators",
    "llm_backend": "register_llm_backends",
}
KINDS = tuple(HOOK_FOR_KIND)
