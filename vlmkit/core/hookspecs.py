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
to the first line of the class docstring. A name is registered once per kind: a second plug-in
registering the same name is an error naming both.

Besides the seven component hooks, a plug-in may give recipes what its components need:

- :meth:`VlmkitHookSpecs.register_recipe_placeholders`: ``${name}`` placeholders in recipe strings
  (vlmkit's own ``${demo_data}`` and ``${lcl_data}`` come from :mod:`vlmkit.demo.plugin` and
  :mod:`vlmkit.lcl.plugin` this way);
- :meth:`VlmkitHookSpecs.register_recipe_checks`: checks across recipe fields, run when a recipe
  is validated (vlmkit's "an lcl dataset with strategy mix needs company" rule is one).
"""

from __future__ import annotations

import pluggy

PROJECT = "vlmkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class VlmkitHookSpecs:
    """One hook per component kind, and two for what recipes need from plug-ins."""

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
        """Register evaluators (:class:`vlmkit.core.interfaces.Evaluator`): the entries of a
        recipe's ``eval`` list (``type: <name>`` plus the options of the evaluator's ``Config``, a
        subclass of :class:`~vlmkit.core.interfaces.EvaluatorConfig`). ``evaluate(model, context)``
        gets the model and an :class:`~vlmkit.core.interfaces.EvalContext` (the recipe's datasets
        and their templates, a folder for extra files, the evaluation's label) and returns an
        :class:`~vlmkit.core.interfaces.EvalResult`; ``data_aliases()`` names the datasets it
        reads, checked against the recipe's ``data`` section. ``Evaluator``, ``EvaluatorConfig``,
        ``EvalContext`` and ``EvalResult`` are importable from ``vlmkit``."""

    @hookspec
    def register_recipe_placeholders(self, register):
        """Register recipe placeholders: ``register(name, resolve, summary=None)``.

        ``${name}`` inside the strings of a recipe's ``model``, ``data``, ``stages`` and ``eval``
        sections is replaced by ``str(resolve())``. ``resolve`` is a function without arguments
        (or a ``"module:function"`` reference, imported when a recipe uses the placeholder) that
        returns a path or text, e.g. a data folder it writes to a cache on first use. It may raise
        :class:`vlmkit.core.errors.VlmkitError` for a user-facing problem. ``name`` is a letter then
        letters, digits or ``_``; the loader's own ``recipe_dir``, ``data_root`` and ``package``
        are taken."""

    @hookspec
    def register_recipe_checks(self, register):
        """Register checks across recipe fields: ``register(name, check, summary=None)``.

        ``check(recipe, datasets)`` runs on every recipe that passed its per-field validation:
        ``recipe`` is the validated :class:`vlmkit.core.recipe.schema.Recipe`, ``datasets`` maps each
        ``data`` alias to its validated spec (``.name``: the dataset type, ``.config``: an instance
        of its ``Config``). It returns a list of problems, each ``"<field path>: <what is wrong and
        what is allowed>"`` (empty: fine); they are reported with the recipe's other problems."""

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
#: the recipe extension hooks: what they register -> hook name
HOOK_FOR_RECIPE_EXTENSION = {
    "placeholder": "register_recipe_placeholders",
    "check": "register_recipe_checks",
}
#: placeholders the recipe loader resolves itself (``${package:NAME}`` is written with its argument)
LOADER_PLACEHOLDERS = ("recipe_dir", "data_root", "package")
