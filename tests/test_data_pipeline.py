"""The data pipeline end to end: a tiny model trains on the demo MIMIC-IT data (captions, images,
in-context examples, video clips, text only) through the engine, with both fusions; recipe paths
take ${recipe_dir} and ${demo_data}."""

from __future__ import annotations

import copy

import pytest

from tiny import toy_mapping, write_recipe
from vlmkit.demo.data import recipe_data
from vlmkit.core.engine import run
from vlmkit.core.errors import RecipeError
from vlmkit.core.recipe.loader import load_recipe


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLMKIT_CACHE", str(path))
    yield path
    mp.undo()


def demo_recipe(fusion: str) -> dict:
    data = toy_mapping()
    data["profiles"] = {}
    data.pop("default_profile")
    data["data"] = {k: v for k, v in recipe_data("${demo_data}").items() if not k.endswith("eval")}
    if fusion == "gated_cross_attention":
        data["model"]["fusion"] = {"name": "gated_cross_attention", "every_n_layers": 1, "heads": 2, "dim_head": 8}
        data["model"]["connector"] = {"name": "perceiver", "num_latents": 4, "depth": 1, "heads": 2, "dim_head": 8}
    data["run"] = {"export": False}
    data["stages"] = [
        {"name": "align", "data": ["demo_captions"], "lr": 3.0e-3, "max_steps": 2, "batch_size": 4,
         "tune": {"encoder": "frozen", "connector": "full", "fusion": "full", "decoder": "frozen"}},
        {"name": "instruct", "data": ["demo_images", "demo_in_context", "demo_video", "demo_text"],
         "lr": 1.0e-3, "max_steps": 8, "batch_size": 2, "max_length": 160,
         "tune": {"encoder": "frozen", "connector": "full", "fusion": "full", "decoder": "frozen",
                  "embeddings": "new_tokens"}},
    ]
    return data


@pytest.mark.parametrize("fusion", ["prefix", "gated_cross_attention"])
def test_tiny_model_trains_on_the_demo_data(cache, tmp_path, fusion):
    path = write_recipe(tmp_path, demo_recipe(fusion))
    resolved = load_recipe(path)
    assert str(cache) in resolved.recipe.data["demo_images"].model_extra["instructions"]
    result = run(resolved, tmp_path / "run", progress=False)
    assert [s.steps for s in result.stages] == [2, 8]
    assert all(loss == loss and loss > 0 for s in result.stages for loss in s.losses)
    tok = result.model.decoder.tokenizer
    assert {"<image>", "<answer>", "<|endofchunk|>"} <= set(tok.get_vocab())  # the otter template's tokens


def test_recipe_dir_placeholder_and_unknown_placeholder(tmp_path):
    data = copy.deepcopy(toy_mapping())
    data["data"]["text"] = {"type": "text_only", "template": "vicuna_v1", "path": "${recipe_dir}/qa.json"}
    (tmp_path / "qa.json").write_text('[{"instruction": "2+2?", "answer": "4"}]')
    resolved = load_recipe(write_recipe(tmp_path, data))
    assert resolved.recipe.data["text"].model_extra["path"] == f"{tmp_path}/qa.json"
    data["data"]["text"]["path"] = "${recipe_folder}/qa.json"
    with pytest.raises(RecipeError, match=r"data\.text\.path: unknown placeholder '\$\{recipe_folder\}'; did you mean 'recipe_dir'"):
        load_recipe(write_recipe(tmp_path, data))
