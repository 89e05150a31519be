"""Building a recipe's datasets, so that their errors name the recipe field.

A dataset's config does not know where in the recipe it sits; :func:`build_dataset` makes
``data.<alias>`` known while the dataset is constructed, and a dataset names a bad option with
:func:`field_name` (``data.captions.path`` inside a run, ``captions path`` when built directly).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["build_dataset", "field_name", "dataset_where"]

_WHERE: ContextVar[str | None] = ContextVar("vlmkit_dataset_where", default=None)


@contextmanager
def dataset_where(where: str) -> Iterator[None]:
    """Datasets constructed inside name their options ``<where>.<option>`` (e.g. ``data.captions``)."""
    token = _WHERE.set(where)
    try:
        yield
    finally:
        _WHERE.reset(token)


def field_name(option: str, default_prefix: str) -> str:
    """``data.<alias>.<option>`` while :func:`build_dataset` runs, else ``<default_prefix> <option>``."""
    where = _WHERE.get()
    return f"{where}.{option}" if where else f"{default_prefix} {option}"


def current_where() -> str | None:
    """``data.<alias>`` while :func:`build_dataset` runs, else ``None``."""
    return _WHERE.get()


def build_dataset(registry: Any, alias: str, spec: Any) -> Any:
    """The dataset of the recipe's ``data.<alias>`` entry (``spec``: its built spec)."""
    with dataset_where(f"data.{alias}"):
        return registry.component_class("dataset", spec.name)(spec.config)
