"""The link-context learning package's plug-in: the ``${lcl_data}`` recipe placeholder (the synthetic
ISEKAI-like concepts, written to the user's cache on first use) and the recipe check that an ``lcl``
dataset with ``strategy: mix`` shares its stage evenly with other data."""

from __future__ import annotations

from typing import Any

from vlmkit import hookimpl


@hookimpl
def register_recipe_placeholders(register):
    register(
        "lcl_data",
        "vlmkit.lcl.synthetic_concepts:concepts_data_dir",
        summary="the synthetic ISEKAI-like concepts in the user's cache, written on first use",
    )


def mix_needs_even_company(recipe: Any, datasets: dict[str, Any]) -> list[str]:
    """An ``lcl`` dataset with ``strategy: mix`` (episodes mixed evenly with other data) needs
    another dataset in its stage's data list and ``mix: even`` (or equal per-step counts)."""
    problems = []
    for i, stage in enumerate(recipe.stages):
        mixed = [a for a in stage.data if a in datasets and datasets[a].name == "lcl" and datasets[a].config.strategy == "mix"]
        evenly = stage.mix == "even" or (isinstance(stage.mix, dict) and len(set(stage.mix.values())) == 1)
        if mixed and (len(stage.data) < 2 or not evenly):
            problems.append(
                f"stages.{i}: data.{mixed[0]} has strategy 'mix' (LCL episodes mixed evenly with other data): the stage needs "
                f"another dataset in its data list and mix: even, or equal per-step counts (it has {len(stage.data)} "
                f"dataset(s), mix: {stage.mix})"
            )
    return problems


@hookimpl
def register_recipe_checks(register):
    register("lcl_mix_needs_even_company", mix_needs_even_company)
