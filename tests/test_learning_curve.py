"""run.eval_every: the eval list during training, the learning curve, and training unchanged by it."""

from __future__ import annotations

import json

from vlmkit.core.engine import run
from vlmkit.core.evaluation.curve import drop_step_evaluations_after, learning_curve_points
from vlmkit.core.recipe.loader import load_recipe


def _overrides(extra):
    return ["run.checkpoint_every=null", "run.export=false", "stages.align.enabled=false",
            "stages.instruct.max_steps=4", *extra]


def test_eval_every_writes_a_learning_curve_and_leaves_the_training_unchanged(tmp_path):
    plain = run(load_recipe("otter_mimicit", "smoke", _overrides(["run.eval_before=true"])), tmp_path / "plain",
                progress=False)
    curve = run(load_recipe("otter_mimicit", "smoke", _overrides(["run.eval_before=true", "run.eval_every=2"])),
                tmp_path / "curve", progress=False)
    # the evaluation at step 2 puts the random state and modes back: the losses are the same
    assert curve.stages[-1].losses == plain.stages[-1].losses
    folder = tmp_path / "curve"
    assert sorted(p.name for p in (folder / "eval").iterdir() if p.is_dir()) == ["after", "before", "step-2"]
    assert not (tmp_path / "plain" / "learning_curve.png").exists()  # no eval_every: no curve
    png = (folder / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    data = json.loads((folder / "eval" / "learning_curve.json").read_text())
    after = json.loads((folder / "eval" / "after" / "instructions.json").read_text())
    step2 = json.loads((folder / "eval" / "step-2" / "instructions.json").read_text())
    # before at 0, step-2 at 2, after at the last step (4); the values are the results' own
    assert data["instructions"]["all"] == {"0": data["instructions"]["all"]["0"], "2": step2["metrics"]["all"],
                                           "4": after["metrics"]["all"]}
    assert set(data) == {"instructions", "instructions_in_context", "image_use"}


def test_a_fresh_start_drops_an_earlier_runs_step_evaluations(tmp_path):
    for step in (2, 5, 9):
        sub = tmp_path / "eval" / f"step-{step}"
        sub.mkdir(parents=True)
        (sub / "instructions.json").write_text(json.dumps({"name": "instructions", "metric": "accuracy",
                                                           "metrics": {"all": step / 10}}))
    assert learning_curve_points(tmp_path, final_step=12) == {"instructions": {"all": {2: 0.2, 5: 0.5, 9: 0.9}}}
    removed = drop_step_evaluations_after(tmp_path, 5)  # a run resumed at step 5 evaluates 9 anew
    assert [p.name for p in removed] == ["step-9"]
    assert learning_curve_points(tmp_path, final_step=12) == {"instructions": {"all": {2: 0.2, 5: 0.5}}}
    drop_step_evaluations_after(tmp_path, 0)  # a fresh start
    assert learning_curve_points(tmp_path, final_step=12) == {}


def test_a_panel_with_many_rows_draws_the_overall_ones():
    from vlmkit.core.evaluation.curve import MAX_PLOTTED_ROWS, plotted_rows

    few = {f"type{i}": {0: 0.0} for i in range(MAX_PLOTTED_ROWS)}
    assert plotted_rows(few) == list(few)
    many = {"all: loss gap": {0: 0.0}, "all: acc gap": {0: 0.0}, **{f"t{i}: loss gap": {0: 0.0} for i in range(12)}}
    assert plotted_rows(many) == ["all: loss gap", "all: acc gap"]
    unnamed = {f"t{i}": {0: 0.0} for i in range(12)}
    assert plotted_rows(unnamed) == list(unnamed)  # nothing overall to fall back to: every row
