"""The recipes under benchmarks/recipes/ that README rows were measured with still load, and say
what the rows say they do."""

from __future__ import annotations

from pathlib import Path

from vlmkit.core.recipe.loader import load_recipe

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes"


def test_the_curriculum_goes_captions_then_single_questions_then_in_context():
    resolved = load_recipe(str(ROOT / "otter_curriculum.yaml"))
    stages = resolved.recipe.stages
    assert [s.name for s in stages] == ["align", "single", "instruct"]
    assert stages[0].data == ["captions"]
    assert "in_context" not in stages[1].data and "images" in stages[1].data
    assert "in_context" in stages[2].data
    demo = load_recipe("otter_mimicit")  # the same step budget after align as the shipped demo
    assert stages[1].max_steps + stages[2].max_steps == demo.recipe.stages[1].max_steps
    assert resolved.recipe.model == demo.recipe.model and resolved.recipe.eval == demo.recipe.eval
