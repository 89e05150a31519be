"""vlmkit: multimodal LLMs from swappable parts.

The plug-in author's contract is :data:`hookimpl` (the hooks are documented in
:mod:`vlmkit.core.hookspecs`) plus the interfaces and markers of :mod:`vlmkit.core.interfaces`,
re-exported here lazily, so importing ``hookimpl`` stays cheap: ``BuildContext`` and ``ModelComponent``, the component interfaces and their
configs, ``Sample``, the evaluator's ``Evaluator``, ``EvaluatorConfig``, ``EvalContext`` and
``EvalResult``, and the text markers ``IMAGE_TOKEN`` and ``END_OF_CHUNK``.
"""

from __future__ import annotations

from typing import Any

from vlmkit.core.hookspecs import hookimpl

__version__ = "0.1.0"

_INTERFACE_NAMES = {
    "BuildContext",
    "ModelComponent",
    "ComponentConfig",
    "Preprocess",
    "VisionEncoder",
    "EncoderConfig",
    "Connector",
    "ConnectorConfig",
    "Fusion",
    "FusionConfig",
    "LanguageDecoder",
    "DecoderConfig",
    "Dataset",
    "DatasetConfig",
    "Sample",
    "Template",
    "TemplateConfig",
    "Evaluator",
    "EvaluatorConfig",
    "EvalContext",
    "EvalResult",
    "IMAGE_TOKEN",
    "END_OF_CHUNK",
}

__all__ = ["hookimpl", "__version__", "load", *sorted(_INTERFACE_NAMES)]


def __getattr__(name: str) -> Any:
    if name == "load":  # vlmkit.load(path): a model exported by vlmkit.core.export
        from vlmkit.core.export import load

        return load
    if name in _INTERFACE_NAMES:
        from vlmkit.core import interfaces

        return getattr(interfaces, name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
