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


class ToyCaptions:
    """The toy_captions dataset rendered as its recipe renders it (llava_plain): index -> Sample."""

    def __init__(self, config):
        from vlmkit.templates.llava import LlavaPlainTemplate
        from vlmkit.datasets.toy import ToyCaptions as Records
        from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer

        self.records = Records(config)
        self.template = LlavaPlainTemplate(LlavaPlainTemplate.Config())
        self.tokenizer = byte_level_tokenizer()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.template.render(self.records[index], self.tokenizer)


def ToyCaptionsConfig(**kwargs):  # noqa: N802 - mirrors the dataset's config class
    from vlmkit.datasets.toy import ToyCaptionsConfig as Config

    return Config(**kwargs)
