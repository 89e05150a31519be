"""The LCL recipes: lcl_repro and its ICL-only twin train and write the three LCL evaluations;
the twin changes only the training data; the mix strategy needs an even mix with other data."""

from __future__ import annotations

import json

import pytest

from tests.tiny import write_recipe
from vlmkit.core.engine import run
from vlmkit.core.engine.sampler import StageBatchSampler
from vlmkit.core.recipe.loader import RecipeError, load_recipe


@pytest.mark.parametrize("name", ["lcl_repro", "lcl_repro_icl"])
def test_smoke_profile_trains_and_writes_the_lcl_evaluations(name, tmp_path):
    resolved = load_recipe(name, "smoke")
    result = run(resolved, tmp_path / "run", progress=False)
    assert [s.steps for s in result.stages] == [2, 2, 2]  # align, train, train_random
    names = [r.name for r in result.evaluations["after"]]
    assert names == ["lcl", "lcl_false_ratio", "lcl_position"]
    folder = tmp_path / "run" / "eval" / "after"
    for n in names:
        data = json.loads((folder / f"{n}.json").read_text())
        assert data["curves"] and data["items"]
        assert (folder / f"{n}.png").stat().st_size > 1000 and (folder / f"{n}.md").is_file()
    lcl = result.evaluations["after"][0]
    assert set(lcl.metrics) == {"2 shots", "4 shots", "2 shots, likelihood", "4 shots, likelihood"}
    assert all(0.0 <= v <= 1.0 for v in lcl.metrics.values())


def test_the_icl_twin_differs_only_in_its_training_data():
    lcl, icl = load_recipe("lcl_repro"), load_recipe("lcl_repro_icl")
    assert lcl.recipe.model == icl.recipe.model and lcl.recipe.eval == icl.recipe.eval
    assert lcl.recipe.stages[0] == icl.recipe.stages[0]  # the same align stage: the same starting model
    assert [s.name for s in lcl.recipe.stages] == [s.name for s in icl.recipe.stages] == ["align", "train", "train_random"]
    for a, b, data in zip(lcl.recipe.stages[1:], icl.recipe.stages[1:], (["lcl_train"], ["lcl_random"])):
        assert a.data == data and b.data == ["in_context"]
        assert a.model_dump(exclude={"data"}) == b.model_dump(exclude={"data"})
    assert icl.datasets["in_context"].config.group == "IMAGE_TEXT_IN_CONTEXT"
    # the paper's order: [2-way] at a fixed 16 shots, then shot counts drawn from 2..16
    first, then = lcl.datasets["lcl_train"].config, lcl.datasets["lcl_random"].config
    assert (first.strategy, first.shots) == ("2way", 16)
    assert (then.strategy, then.min_shots, then.max_shots) == ("2way_random", 2, 16)


def _mix_recipe(tmp_path, mix, data):
    base = load_recipe("lcl_repro", "smoke")
    recipe = base.recipe.model_dump(exclude_none=True, exclude={"profiles", "default_profile", "extends"})
    recipe["data"]["lcl_train"]["strategy"] = "mix"
    recipe["data"]["captions"] = {"type": "toy_captions", "template": "llava_plain", "num_samples": 16}
    recipe["stages"][1]["data"] = data
    recipe["stages"][1]["mix"] = mix
    return write_recipe(tmp_path, recipe)


def test_mix_strategy_needs_an_even_mix_with_other_data(tmp_path):
    with pytest.raises(RecipeError, match="strategy 'mix'.*mix: even"):
        load_recipe(_mix_recipe(tmp_path, "size", ["lcl_train", "captions"]))
    with pytest.raises(RecipeError, match="another dataset"):
        load_recipe(_mix_recipe(tmp_path, "even", ["lcl_train"]))
    ok = load_recipe(_mix_recipe(tmp_path, "even", ["lcl_train", "captions"]))
    assert ok.recipe.stages[1].mix == "even"


def test_an_even_mix_draws_datasets_equally_whatever_their_sizes():
    sampler = StageBatchSampler([1000, 40], 4, seed=0, stage_index=0, weights=[1.0, 1.0])
    firsts = [batch[0] for _, batch in zip(range(4000), sampler)]
    share = sum(i >= 1000 for i in firsts) / len(firsts)
    assert abs(share - 0.5) < 0.03
