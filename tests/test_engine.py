"""The engine: exact resume (after kill -9, between stages, after Ctrl-C), atomic checkpoints,
NaN handling, frozen parts untouched, and the same step on 1 or 2 processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny import resolved_toy, toy_mapping, write_recipe
from vlmkit.core.engine import RunInterrupted, run
from vlmkit.core.engine.state import checkpoint_dirs, load_training_state
from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.loader import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def recipe_file(tmp_path: Path, steps: int = 6, **run_opts) -> Path:
    data = toy_mapping()
    data["profiles"] = {}
    data.pop("default_profile")
    for stage in data["stages"]:
        stage["max_steps"] = steps
        stage["batch_size"] = 4
    data["stages"][1]["tune"]["connector"] = "full"
    data["run"] = {"checkpoint_every": 1, "keep_last": 100, "export": False} | run_opts
    return write_recipe(tmp_path, data, "engine.yaml")


def final_state(out: Path) -> dict[str, torch.Tensor]:
    last = checkpoint_dirs(out)[-1]
    trainer = json.loads((last / "trainer.json").read_text())
    assert trainer["stage_done"] and trainer["stage_index"] == 1
    state = {f"model.{k}": v for k, v in load_file(str(last / "model.safetensors")).items()}
    state |= {f"opt.{k}": v for k, v in load_file(str(last / "optimizer.safetensors")).items()}
    return state


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the tiny two-stage recipe, a checkpoint after every step."""
    tmp = tmp_path_factory.mktemp("ref")
    path = recipe_file(tmp)
    run(load_recipe(path), tmp / "run", progress=False)
    return path, tmp / "run"


def _cut_after(src: Path, dst: Path, global_step: int) -> None:
    """``dst``: ``src`` as a kill -9 right after checkpoint ``global_step`` would have left it."""
    shutil.copytree(src, dst)
    for ckpt in checkpoint_dirs(dst):
        if int(ckpt.name.split("-")[1]) > global_step:
            shutil.rmtree(ckpt)
    (dst / "loss.png").unlink(missing_ok=True)


@pytest.mark.parametrize("cut", [1, 4, 6, 7, 9])  # 6: between the stages (stage 0 done)
def test_resume_from_any_checkpoint_is_bitwise_exact(reference, tmp_path, cut):
    path, ref = reference
    _cut_after(ref, tmp_path / "run", cut)
    resumed = run(load_recipe(path), tmp_path / "run", progress=False)
    assert resumed.resumed_from is not None and resumed.resumed_from.name == f"step-{cut:08d}"
    assert_bitwise_equal(final_state(tmp_path / "run"), final_state(ref))
    # the run log holds every step exactly once
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == list(range(1, 13))
    ref_records = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]


def test_kill_9_at_a_random_moment_then_resume(reference, tmp_path):
    path, ref = reference
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlmkit.core.cli", "run", str(path), "--output-dir", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not checkpoint_dirs(out) and time.time() < deadline:
            time.sleep(0.05)
        assert checkpoint_dirs(out), "the run wrote no checkpoint"
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    # whatever the moment, every visible checkpoint is complete and loadable
    for ckpt in checkpoint_dirs(out):
        load_training_state(ckpt)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_bitwise_equal(final_state(out), final_state(ref))


def test_ctrl_c_saves_and_resume_is_exact(reference, tmp_path, monkeypatch):
    path, ref = reference
    from vlmkit.core.engine import step as step_module

    calls = {"n": 0}
    original = step_module.TrainStep.__call__

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in stage 1, its 3rd step
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(step_module.TrainStep, "__call__", interrupting)
    resolved = load_recipe(path.parent / path.name)
    data = yaml.safe_load(path.read_text())
    data["run"]["checkpoint_every"] = 100  # only the Ctrl-C checkpoint inside stage 1
    no_periodic = write_recipe(tmp_path, data, "no_periodic.yaml")
    with pytest.raises(RunInterrupted, match="checkpoint saved"):
        run(load_recipe(no_periodic), tmp_path / "run", progress=False)
    last = checkpoint_dirs(tmp_path / "run")[-1]
    assert json.loads((last / "trainer.json").read_text())["global_step"] == 8
    monkeypatch.setattr(step_module.TrainStep, "__call__", original)
    run(load_recipe(no_periodic), tmp_path / "run", progress=False)
    assert_bitwise_equal(final_state(tmp_path / "run"), final_state(ref))
    assert resolved.recipe.stages[1].max_steps == 6


def test_nan_loss_stops_naming_step_and_samples_and_keeps_last_good(tmp_path, monkeypatch):
    path = recipe_file(tmp_path)
    from vlmkit.core.compose import VisionLanguageModel

    calls = {"n": 0}
    original = VisionLanguageModel.forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        if calls["n"] == 3:
            out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(VisionLanguageModel, "forward", poisoned)
    with pytest.raises(VlmkitError, match=r"stage 'align' step 3: the loss is nan for the batch of samples toy-\d+") as err:
        run(load_recipe(path), tmp_path / "run", progress=False)
    assert "last good checkpoint" in str(err.value)
    assert [c.name for c in checkpoint_dirs(tmp_path / "run")] == ["step-00000001", "step-00000002"]


def test_frozen_bitwise_unchanged_trainable_changed(reference):
    path, ref = reference
    from vlmkit.core.compose import build_model

    fresh = build_model(load_recipe(path))
    trained = load_file(str(checkpoint_dirs(ref)[-1] / "model.safetensors"))
    # tuning.json beside the weights: each stage's record, whose names are exactly the weights saved
    records = json.loads((checkpoint_dirs(ref)[-1] / "tuning.json").read_text())
    assert [r["stage"] for r in records] == ["stages.0", "stages.1"]
    assert set().union(*(r["names"] for r in records)) == set(trained)
    assert any(k.startswith("connector.") for k in trained) and any(k.startswith("decoder.") for k in trained)
    assert not any(k.startswith("encoder.") for k in trained)
    init = dict(fresh.named_parameters())
    for key, value in trained.items():
        assert not torch.equal(init[key], value), f"{key} trained but did not change"


def test_resume_guards(reference, tmp_path):
    path, ref = reference
    shutil.copytree(ref, tmp_path / "run")
    again = run(load_recipe(path), tmp_path / "run", progress=False)
    assert again.complete_before and [s.steps for s in again.stages] == [6, 6]
    with pytest.raises(VlmkitError, match="different recipe"):
        run(load_recipe(path, overrides=["stages.align.lr=0.5"]), tmp_path / "run", progress=False)
    with pytest.raises(VlmkitError, match="holds no checkpoint"):
        run(load_recipe(path), tmp_path / "empty", progress=False, resume=True)


def _accelerate_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def test_two_processes_take_the_same_steps_as_one(tmp_path):
    """accelerate launch with the shipped ddp config, 2 processes on the CPU (gloo), batch 4 = 2 per process
    gives the parameters of one process with batch 4, within 1e-6."""
    data = yaml.safe_load(recipe_file(tmp_path, steps=2).read_text())
    data["run"] = {"checkpoint_every": None, "export": False}
    # Adam's first steps move a weight by lr * g / (|g| + eps): where |g| is near eps (1e-8), the
    # ~1e-7 relative difference of summing gradients in another order is amplified to ~1e-6. A larger
    # eps keeps the comparison about the step itself (wrong sharding or a per-process loss mean
    # still shows as >= 1e-5 after two steps).
    for stage in data["stages"]:
        stage["optimizer"] = {"eps": 1.0e-6}
    path = write_recipe(tmp_path, data, "ddp.yaml")
    # the shipped ddp config uses accelerate's torchrun launcher; without CUDA the engine's
    # Accelerator(cpu=True) makes the processes a gloo group
    from vlmkit.launch import path as launch_config

    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config("ddp")),
                  "--num_processes", "2"]
    cli = ["-m", "vlmkit.core.cli", "run", str(path), "--no-progress"]
    two = subprocess.run([*accelerate, *cli, "--output-dir", str(tmp_path / "two")], env=_accelerate_env(),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "trained on 2 processes (cpu)" in two.stdout
    one = subprocess.run([sys.executable, *cli, "--output-dir", str(tmp_path / "one")], env=_accelerate_env(),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "trained on 1 process (cpu)" in one.stdout
    a = load_file(str(checkpoint_dirs(tmp_path / "one")[-1] / "model.safetensors"))
    b = load_file(str(checkpoint_dirs(tmp_path / "two")[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    losses_one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    losses_two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert losses_one == pytest.approx(losses_two, abs=1e-5)


def test_lora_stage_changes_only_the_adapters_and_what_else_trains(tmp_path):
    data = yaml.safe_load(recipe_file(tmp_path, steps=3).read_text())
    data["stages"][1]["tune"]["decoder"] = {"mode": "lora", "lora": {"r": 4, "alpha": 8}}
    data["stages"][1]["tune"]["connector"] = "frozen"
    path = write_recipe(tmp_path, data, "lora.yaml")
    result = run(load_recipe(path), tmp_path / "run", progress=False)
    ckpts = checkpoint_dirs(tmp_path / "run")
    after_align = load_file(str(next(c for c in ckpts if c.name == "step-00000003") / "model.safetensors"))
    final = dict(result.model.named_parameters())
    from vlmkit.core.compose import build_model

    fresh = dict(build_model(load_recipe(path)).named_parameters())
    adapters = [n for n in final if "lora_" in n]
    assert adapters and all(final[n].abs().sum() > 0 for n in adapters if "lora_B" in n)  # B starts at zero
    for name, value in final.items():
        if "lora_" in name:
            continue
        base = name.replace(".base_layer", "")
        if name.startswith("connector."):  # trained in stage 0 only: as stage 0 left it
            assert torch.equal(value, after_align[name]), name
        else:  # encoder, decoder base weights: as built
            assert torch.equal(value, fresh[base]), name


def test_gradient_checkpointing_takes_the_same_steps(tmp_path):
    data = yaml.safe_load(recipe_file(tmp_path, steps=2).read_text())
    data["run"] = {"checkpoint_every": None, "export": False}
    plain = run(load_recipe(write_recipe(tmp_path, data, "plain.yaml")), tmp_path / "a", progress=False)
    data["run"]["gradient_checkpointing"] = True
    ckpt = run(load_recipe(write_recipe(tmp_path, data, "ckpt.yaml")), tmp_path / "b", progress=False)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.decoder.modules())
    for (name, a), (_, b) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert plain.stages[1].losses == pytest.approx(ckpt.stages[1].losses, abs=1e-6)


def test_bf16_stage_runs_and_learns(tmp_path):
    data = yaml.safe_load(recipe_file(tmp_path, steps=4).read_text())
    data["run"] = {"checkpoint_every": None, "export": False}
    data["stages"] = [data["stages"][1] | {"precision": "bf16", "lr": 3.0e-3}]
    result = run(load_recipe(write_recipe(tmp_path, data, "bf16.yaml")), tmp_path / "run", progress=False)
    losses = result.stages[0].losses
    assert all(map(lambda x: x == x and abs(x) < 100, losses)) and losses[-1] < losses[0]
    assert next(result.model.parameters()).dtype == torch.float32  # autocast, master weights fp32


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from vlmkit.core.engine import state as state_module

    out = tmp_path / "run"
    resolved = resolved_toy(tmp_path, lambda d: d.update(run={"checkpoint_every": 1}))
    real_save = state_module.save_file
    calls = {"n": 0}

    def filling_up(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (3 files) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state_module, "save_file", filling_up)
    with pytest.raises(VlmkitError, match=r"cannot write the checkpoint .*step-00000002: .*No space left on device.*"
                                          r"the last complete checkpoint, .*step-00000001, is kept"):
        run(resolved, out, progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # no half-written folder
