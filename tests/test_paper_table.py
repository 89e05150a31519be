"""The README's table of the papers' hyper-parameters is checked against the shipped recipes:
every row's field, read from the validated ``paper`` profile (defaults included, as the run would
use it), has the row's value. A recipe change that drifts from a paper fails here."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmkit.core.recipe.loader import load_recipe

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- paper-hparams:start -->", "<!-- paper-hparams:end -->"
NO_STAGE = "-"


def _rows() -> list[dict[str, str]]:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, f"README.md has no table between {START} and {END}"
    body = text[text.index(START) + len(START) : text.index(END)]
    lines = [line.strip() for line in body.splitlines() if line.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["recipe", "stage", "field", "value", "source"], header
    rows = []
    for line in lines[2:]:  # after the header and its |---| line
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    return rows


ROWS = _rows()


def test_the_table_covers_every_paper_recipe():
    assert len(ROWS) >= 30
    assert {r["recipe"] for r in ROWS} >= {"otter_mimicit", "llava", "llava_lora", "mplug_owl", "blip2", "lcl_repro"}
    assert all(r["source"] for r in ROWS)


_RESOLVED: dict[str, dict[str, Any]] = {}


def _paper(recipe: str) -> dict[str, Any]:
    """The paper profile as the engine sees it: every section validated, defaults filled in."""
    if recipe not in _RESOLVED:
        r = load_recipe(recipe, "paper")
        _RESOLVED[recipe] = {
            "model": {kind: spec.config.model_dump(mode="json") | {"name": spec.name} for kind, spec in r.components.items()},
            "data": {alias: spec.config.model_dump(mode="json") | {"type": spec.name} for alias, spec in r.datasets.items()},
            "stages": {s.name: s.model_dump(mode="json") for s in r.recipe.stages},
            "eval": [spec.config.model_dump(mode="json") | {"type": spec.name} for spec in r.evaluators],
            "run": r.recipe.run.model_dump(mode="json"),
        }
    return _RESOLVED[recipe]


def _value(text: str) -> Any:
    """A table cell as a value: numbers as written (``2e-5`` too, which YAML 1.1 reads as a string),
    anything else as YAML (``[0.9, 0.98]``, ``bf16``, ``null``, ``{}``)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _lookup(node: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(f"{path}: no '{part}' here (keys: {sorted(node) if isinstance(node, dict) else node!r})")
    return node


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool) and isinstance(actual, (int, float)):
        return math.isclose(float(actual), float(expected), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(expected, list) and isinstance(actual, (list, tuple)):
        return len(actual) == len(expected) and all(_same(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return all(k in actual and _same(actual[k], v) for k, v in expected.items()) and len(actual) == len(expected)
    return actual == expected


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['recipe']}:{r['stage']}:{r['field']}" for r in ROWS])
def test_paper_profile_has_the_papers_value(row):
    resolved = _paper(row["recipe"])
    path = row["field"] if row["stage"] == NO_STAGE else f"stages.{row['stage']}.{row['field']}"
    expected = _value(re.sub(r"\s*\(.*\)$", "", row["value"]))  # "(...)" after a value is a note
    actual = _lookup(resolved, path)
    assert _same(actual, expected), f"{row['recipe']} paper: {path} is {actual!r}, the paper says {expected!r} ({row['source']})"
