"""Tiny random-init recipes for tests (built from the shipped toy_prefix recipe)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vlmkit.core.recipe.loader import find_recipe, load_recipe


def toy_mapping() -> dict[str, Any]:
    return yaml.safe_load(find_recipe("toy_prefix").read_text())


def write_recipe(tmp_path: Path, data: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def resolved_toy(tmp_path: Path, mutate=None, profile: str | None = "smoke", registry=None):
    data = copy.deepcopy(toy_mapping())
    if mutate is not None:
        mutate(data)
    return load_recipe(write_recipe(tmp_path, data), profile=profile, registry=registry)
