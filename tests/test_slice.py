"""The vertical slice: a tiny recipe builds, trains and checkpoints; the loss falls."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from tiny import resolved_toy
from vlmkit.core.compose import build_model
from vlmkit.core.engine import run


def _one_stage(steps: int, lr: float = 3e-3):
    def mutate(data):
        data["stages"] = [data["stages"][1] | {"max_steps": steps, "lr": lr, "schedule": "constant", "warmup_ratio": 0.0}]
        data["profiles"] = {}
        data.pop("default_profile")

    return mutate


def test_loss_falls_over_30_steps(tmp_path):
    # connector and decoder train (the instruct stage of toy_prefix), 30 steps of batch 8
    resolved = resolved_toy(tmp_path, _one_stage(30), profile=None)
    result = run(resolved, tmp_path / "run", progress=False)
    losses = result.stages[0].losses
    assert len(losses) == 30
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_run_writes_checkpoint_with_trainable_weights_and_recipe(tmp_path):
    resolved = resolved_toy(tmp_path)  # smoke: 3 steps per stage
    out = tmp_path / "run"
    result = run(resolved, out, progress=False)
    assert [s.name for s in result.stages] == ["align", "instruct"]
    align = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert align and all(k.startswith("connector.") for k in align)
    instruct = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert any(k.startswith("decoder.") for k in instruct) and any(k.startswith("connector.") for k in instruct)
    assert not any(k.startswith("encoder.") for k in instruct)
    # the saved weights are the model's final weights
    final = dict(result.model.named_parameters())
    for key, tensor in instruct.items():
        torch.testing.assert_close(tensor, final[key].detach(), rtol=0, atol=0)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [("align", i) for i in (1, 2, 3)] + [("instruct", i) for i in (1, 2, 3)]
    meta = json.loads((out / "checkpoints" / "step-00000006" / "trainer.json").read_text())
    assert meta["stage"] == "instruct" and meta["step"] == 3 and meta["stage_done"]
    assert "toy_prefix" in (out / "checkpoints" / "step-00000003" / "recipe.yaml").read_text()
    assert not list(out.rglob(".*tmp*")), "no temporary folders are left behind"


def test_frozen_parts_do_not_change(tmp_path):
    resolved = resolved_toy(tmp_path)
    model = build_model(resolved)
    before = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    result = run(resolved, tmp_path / "run", progress=False)
    after = result.model.encoder.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value)


def test_same_seed_same_losses(tmp_path):
    a = run(resolved_toy(tmp_path), tmp_path / "a", progress=False)
    b = run(resolved_toy(tmp_path), tmp_path / "b", progress=False)
    assert a.stages[0].losses == b.stages[0].losses
    assert a.stages[1].losses == b.stages[1].losses


def test_frozen_components_run_in_eval_mode(tmp_path):
    """A frozen encoder with BatchNorm keeps its running statistics while the rest trains."""

    def mutate(data):
        data["model"]["encoder"] = {"name": "timm", "model_name": "efficientnet_lite0", "image_size": 32}

    resolved = resolved_toy(tmp_path, mutate)
    model = build_model(resolved)
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    assert stats
    result = run(resolved, tmp_path / "run", progress=False)
    for key, value in stats.items():
        torch.testing.assert_close(result.model.encoder.state_dict()[key], value, rtol=0, atol=0)
    assert not result.model.encoder.training and result.model.connector.training
