"""Recipe placeholders and recipe checks come from plug-ins (``register_recipe_placeholders``,
``register_recipe_checks``), vlmkit's own demo and lcl packages included: the recipe loader knows
only ``${recipe_dir}``, ``${data_root}`` and ``${package:NAME}``."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from tiny import toy_mapping, write_recipe
from vlmkit import hookimpl
from vlmkit.core.errors import DuplicateComponentError, PluginError, RecipeError
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import Provider, Registry

LOADER = Path(__file__).resolve().parents[1] / "vlmkit" / "core" / "recipe" / "loader.py"


class ShardsPlugin:
    """A third-party dataset package's plug-in: ``${shards}`` and a rule on its datasets."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.calls = 0

    def shards_dir(self) -> str:
        """where the shards are"""
        self.calls += 1
        return str(self.folder)

    @hookimpl
    def register_recipe_placeholders(self, register):
        register("shards", self.shards_dir)

    @hookimpl
    def register_recipe_checks(self, register):
        def text_needs_json(recipe, datasets):
            return [f"data.{alias}.path: a text_only dataset in this package reads .json files"
                    for alias, spec in datasets.items()
                    if spec.name == "text_only" and not str(spec.config.path).endswith(".json")]

        register("text_needs_json", text_needs_json, summary="text_only paths end in .json")


def text_recipe(tmp_path: Path, path: str) -> Path:
    data = copy.deepcopy(toy_mapping())
    data["data"]["text"] = {"type": "text_only", "template": "vicuna_v1", "path": path}
    return write_recipe(tmp_path, data)


@pytest.fixture
def qa(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "qa.json").write_text('[{"instruction": "2+2?", "answer": "4"}]', encoding="utf-8")
    (folder / "qa.txt").write_text("not json", encoding="utf-8")
    return folder


def test_a_plugin_placeholder_resolves(tmp_path, qa):
    plugin = ShardsPlugin(qa)
    reg = Registry(entry_points=False, plugins=[("shards_pkg", plugin)])
    entry = reg.placeholders["shards"]
    assert entry.provider == Provider("shards_pkg") and entry.summary == "where the shards are"
    resolved = load_recipe(text_recipe(tmp_path, "${shards}/qa.json"), registry=reg)
    assert resolved.recipe.data["text"].model_extra["path"] == f"{qa}/qa.json"
    assert resolved.datasets["text"].config.path == qa / "qa.json"
    assert plugin.calls == 1


def test_without_the_plugin_the_placeholder_is_unknown_and_the_error_lists_the_registered_ones(tmp_path, qa):
    reg = Registry(entry_points=False)
    with pytest.raises(RecipeError) as err:
        load_recipe(text_recipe(tmp_path, "${shards}/qa.json"), registry=reg)
    [problem] = err.value.problems
    assert problem.startswith("data.text.path: unknown placeholder '${shards}'")
    assert "allowed: ${recipe_dir}, ${data_root}, ${package:NAME}, ${demo_data}, ${lcl_data}" in problem


def test_a_plugin_check_reports_its_problem_with_the_field(tmp_path, qa):
    reg = Registry(entry_points=False, plugins=[("shards_pkg", ShardsPlugin(qa))])
    assert reg.checks["text_needs_json"].summary == "text_only paths end in .json"
    with pytest.raises(RecipeError) as err:
        load_recipe(text_recipe(tmp_path, "${shards}/qa.txt"), registry=reg)
    assert err.value.problems == ["data.text.path: a text_only dataset in this package reads .json files"]
    load_recipe(text_recipe(tmp_path, f"{qa}/qa.txt"), registry=Registry(entry_points=False))  # no plug-in, no rule


def test_demo_and_lcl_provide_their_placeholders_and_check_as_plugins():
    reg = Registry(entry_points=False)
    assert reg.placeholder_names() == ["demo_data", "lcl_data"]
    assert reg.placeholders["demo_data"].provider.plugin == "vlmkit.demo"
    assert reg.placeholders["demo_data"].target == "vlmkit.demo.data:demo_data_dir"
    assert reg.placeholders["lcl_data"].target == "vlmkit.lcl.synthetic_concepts:concepts_data_dir"
    assert list(reg.checks) == ["lcl_mix_needs_even_company"]
    assert reg.checks["lcl_mix_needs_even_company"].provider.describe() == "vlmkit.lcl (built-in)"
    assert {reg.plugins[p].status for p in ("vlmkit", "vlmkit.demo", "vlmkit.lcl")} == {"loaded"}
    # the generic loader imports neither package and tests no dataset's type or option
    source = LOADER.read_text(encoding="utf-8")
    for word in ("vlmkit.demo", "vlmkit.lcl", '"demo_data"', '"lcl_data"', '"lcl"', "strategy"):
        assert word not in source, word


def test_without_builtins_there_are_no_placeholders_or_checks():
    reg = Registry(entry_points=False, builtins=False)
    assert reg.placeholders == {} and reg.checks == {}


@pytest.mark.parametrize(
    ("name", "error", "kind"),
    [
        ("recipe_dir", "recipe placeholder 'recipe_dir' is the recipe loader's own", PluginError),
        ("my-data", "must start with a letter and use letters, digits and '_'", PluginError),
        ("demo_data", "recipe placeholder 'demo_data' is registered twice: by vlmkit.demo (built-in) and by plug-in 'bad'", DuplicateComponentError),
    ],
)
def test_bad_placeholder_registrations(name, error, kind):
    class Bad:
        @hookimpl
        def register_recipe_placeholders(self, register):
            register(name, lambda: "x")

    if kind is DuplicateComponentError:
        with pytest.raises(DuplicateComponentError, match=re.escape(error)):
            Registry(entry_points=False, plugins=[("bad", Bad())])
        return
    with pytest.warns(UserWarning, match=re.escape(error)):
        reg = Registry(entry_points=False, plugins=[("bad", Bad())])
    assert reg.plugins["bad"].status == "failed" and name not in reg.placeholders


def test_a_check_that_returns_no_list_is_a_plugin_error(tmp_path, qa):
    class Sloppy:
        @hookimpl
        def register_recipe_checks(self, register):
            register("sloppy", lambda recipe, datasets: None)

    reg = Registry(entry_points=False, plugins=[("sloppy_pkg", Sloppy())])
    with pytest.raises(PluginError, match="recipe check 'sloppy' from plug-in 'sloppy_pkg' .* must return a list"):
        load_recipe(text_recipe(tmp_path, f"{qa}/qa.json"), registry=reg)
