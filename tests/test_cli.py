"""The ``recipes`` command line, run as a subprocess the way a user runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmkit.core.recipe.loader import shipped_recipes

from vlmkit.core.registry import get_registry

CONNECTORS = ", ".join(get_registry().names("connector"))  # the built-ins, linear and mlp among them

TOY = shipped_recipes()["toy_prefix"]


def recipes(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmkit.core.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def bad_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = yaml.safe_load(TOY.read_text(encoding="utf-8"))
    data["model"]["connector"] = {"name": "mlpp"}
    path = tmp_path_factory.mktemp("bad") / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ errors
def test_validate_bad_recipe_is_one_message_without_traceback(bad_recipe: Path) -> None:
    proc = recipes("validate", bad_recipe)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert "Traceback" not in err
    # one message, one line: the problem of the recipe is not repeated for each of its profiles
    assert err.splitlines() == [
        f"error: {bad_recipe}: model.connector.name: unknown connector 'mlpp'; did you mean 'mlp'? available: {CONNECTORS}"
    ]


def test_validate_debug_shows_traceback(bad_recipe: Path) -> None:
    proc = recipes("validate", bad_recipe, "--debug")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RecipeError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith(f"error: {bad_recipe}: model.connector.name: ")


def test_unknown_recipe_name_suggests() -> None:
    proc = recipes("show", "toy_prefx")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown recipe 'toy_prefx'; did you mean 'toy_prefix'?" in proc.stderr
    assert proc.stderr.startswith("error: ")


def test_bad_set_syntax_exits_2() -> None:
    proc = recipes("show", "toy_prefix", "--set", "stages.align.lr")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--set 'stages.align.lr': expected PATH=VALUE" in proc.stderr


# ------------------------------------------------------------------------------ commands
def test_validate_shipped_recipe() -> None:
    proc = recipes("validate", "toy_prefix")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ok: {TOY} ((no profile), smoke, demo)"


def test_list() -> None:
    proc = recipes("list")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("toy_prefix ")]
    assert len(lines) == 1
    assert "[profiles: smoke, demo]" in lines[0]


def test_show_with_profile_and_set() -> None:
    proc = recipes("show", "toy_prefix", "--profile", "smoke", "--set", "stages.align.lr=0.5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# resolved from {TOY}, profile smoke, --set stages.align.lr=0.5\n")
    shown = yaml.safe_load(proc.stdout)
    assert shown["stages"][0]["name"] == "align"
    assert shown["stages"][0]["lr"] == 0.5
    assert shown["stages"][0]["max_steps"] == 3
    assert shown["stages"][1]["lr"] == 1.0e-3
    assert shown["stages"][1]["max_steps"] == 3
    assert "profiles" not in shown and "default_profile" not in shown


def test_components_connector() -> None:
    proc = recipes("components", "connector")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "connectors:"
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["abstractor", "linear", "mlp", "perceiver", "qformer"]
    assert all("vlmkit (built-in)" in line for line in lines[1:])


def test_plugins_json() -> None:
    proc = recipes("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    builtin = [p for p in report if p["name"] == "vlmkit"]
    assert len(builtin) == 1
    plugin = builtin[0]
    assert plugin["status"] == "loaded" and plugin["error"] is None
    assert plugin["distribution"] == "vlmkit"
    comps = {(c["kind"], c["name"]) for c in plugin["components"]}
    assert {("encoder", "timm"), ("connector", "mlp"), ("connector", "linear"), ("fusion", "prefix"),
            ("decoder", "hf_causal_lm"), ("dataset", "toy_captions")} <= comps
    assert {"encoder", "connector", "fusion", "decoder"} <= {kind for kind, _ in comps}


def _deref(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/$defs/"), ref
        node = schema["$defs"][ref.removeprefix("#/$defs/")]
    return node


def test_schema() -> None:
    proc = recipes("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"name", "model", "data", "stages"} <= set(schema["required"])
    model = _deref(schema, schema["properties"]["model"])
    connector = model["properties"]["connector"]
    choices = [_deref(schema, c) for c in connector.get("anyOf", connector.get("oneOf", [connector]))]
    by_name = {c["properties"]["name"]["const"]: c for c in choices}
    assert set(by_name) == set(CONNECTORS.split(", "))  # every registered connector is a choice
    assert "projector" in by_name["mlp"]["properties"]
    assert "projector" not in by_name["linear"]["properties"]
    assert by_name["mlp"]["additionalProperties"] is False


# ------------------------------------------------------------------------------ a training run
def test_run_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = recipes("run", "toy_prefix", "--profile", "smoke", "--output-dir", out, "--no-progress", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stage align: 3 steps" in proc.stdout and "stage instruct: 3 steps" in proc.stdout

    resolved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert resolved["name"] == "toy_prefix"
    assert [s["max_steps"] for s in resolved["stages"]] == [3, 3]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 6
    assert [(r["stage"], r["step"]) for r in records] == [("align", 1), ("align", 2), ("align", 3),
                                                          ("instruct", 1), ("instruct", 2), ("instruct", 3)]
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)

    from safetensors import safe_open

    # one checkpoint per stage end (keep_last 2): after align, the connector alone trained so far
    with safe_open(str(out / "checkpoints" / "step-00000003" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys, "the align checkpoint is empty"
    assert all(k.startswith("connector.") for k in keys), keys
    with safe_open(str(out / "checkpoints" / "step-00000006" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("connector.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    assert not any(k.startswith("encoder.") for k in keys)  # frozen in both stages

    # the loss PNG is drawn from the JSONL beside it
    from PIL import Image

    from vlmkit.core.engine.run_log import loss_curve_data, read_metrics

    with Image.open(out / "loss.png") as png:
        assert png.size[0] > 100 and png.size[1] > 100
    curves = loss_curve_data(read_metrics(out / "metrics.jsonl"))
    assert curves["align"] == ([1, 2, 3], [r["loss"] for r in records[:3]])
    assert curves["instruct"] == ([4, 5, 6], [r["loss"] for r in records[3:]])
    # the export loads back into a model
    import vlmkit

    model = vlmkit.load(out / "export")
    assert not model.training and model.connector.width_out == 64
