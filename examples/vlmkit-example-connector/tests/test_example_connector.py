"""Tests of the example connector plug-in: the connector on its own (shapes, the pooling against a
reference, the config), its registration, and the example recipe built and trained. They run
whether or not the package is installed (see conftest.py).

The component is tested directly, then through a ``Registry`` that holds only the built-ins and
this plug-in (``entry_points=False``), so the test does not depend on what else is installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vlmkit import Connector, ConnectorConfig
from vlmkit.core.compose import build_model
from vlmkit.core.engine import run
from vlmkit.core.errors import RecipeError
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import Registry
from vlmkit_example_connector import plugin as plugin_module
from vlmkit_example_connector.connector import PooledTokens, PooledTokensConfig

RECIPE = Path(__file__).resolve().parents[1] / "recipe.yaml"


@pytest.fixture
def registry() -> Registry:
    return Registry(entry_points=False, plugins=[("example_connector", plugin_module)])


def connector(**options) -> PooledTokens:
    torch.manual_seed(0)
    return PooledTokens(PooledTokensConfig(width_in=6, width_out=10, **options))


# ------------------------------------------------------------------------------ the connector itself
@pytest.mark.parametrize(("tokens", "frames", "queries"), [(16, 1, 4), (17, 1, 4), (9, 2, 8), (3, 1, 5)])
def test_output_shape_is_num_queries_whatever_the_input(tokens, frames, queries):
    conn = connector(num_queries=queries)
    assert isinstance(conn, Connector) and conn.num_queries(tokens, frames) == queries
    out = conn(torch.randn(2, frames * tokens, 6), num_frames=frames, media_positions=torch.tensor([0, 1]))
    assert out.shape == (2, queries, 10)
    assert torch.isfinite(out).all()


def test_pooling_is_the_mean_of_equal_token_windows():
    conn = connector(num_queries=4)
    x = torch.randn(3, 16, 6)
    reference = x.reshape(3, 4, 4, 6).mean(2)  # 16 tokens -> 4 windows of 4
    torch.testing.assert_close(conn.pool(x), reference)
    # and the MLP follows: fc2(gelu(fc1(pooled)))
    torch.testing.assert_close(conn(x), conn.fc2(torch.nn.functional.gelu(conn.fc1(reference))))


def test_the_output_depends_on_every_input_token():
    conn = connector(num_queries=2)
    x = torch.randn(1, 8, 6, requires_grad=True)
    conn(x).sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def test_config_is_a_connector_config_that_rejects_unknown_keys():
    assert issubclass(PooledTokensConfig, ConnectorConfig)
    with pytest.raises(ValidationError, match="num_querys"):
        PooledTokensConfig.model_validate({"num_querys": 4})
    with pytest.raises(ValidationError):
        PooledTokensConfig(num_queries=0)
    with pytest.raises(ValueError, match="needs width_in and width_out"):
        PooledTokens(PooledTokensConfig(num_queries=4))
    assert connector(hidden=3).fc1.out_features == 3
    assert connector().lora_target_modules() == ["fc1", "fc2"]


# ------------------------------------------------------------------------------ registration
def test_registry_lists_pooled_tokens_as_a_connector(registry):
    entry = registry.entry("connector", "pooled_tokens")
    assert entry.provider.plugin == "example_connector"
    assert entry.summary.startswith("Adaptive average pooling")
    assert registry.component_class("connector", "pooled_tokens") is PooledTokens
    assert entry.config_class is PooledTokensConfig
    info = registry.plugins["example_connector"]
    assert info.status == "loaded" and info.hooks == ["register_connectors"]
    assert info.components == [("connector", "pooled_tokens")]
    assert "mlp" in registry.names("connector")  # the built-ins are still there next to it


def test_recipe_section_is_validated_against_the_config(registry):
    resolved = load_recipe(RECIPE, profile="smoke", registry=registry)
    spec = resolved.components["connector"]
    assert spec.name == "pooled_tokens" and isinstance(spec.config, PooledTokensConfig)
    assert spec.config.num_queries == 4 and spec.config.width_in is None  # the builder fills the widths
    assert "projector" not in resolved.data["model"]["connector"]  # the parent's mlp options are gone
    with pytest.raises(RecipeError, match=r"model\.connector\.num_querys: unknown field"):
        load_recipe(RECIPE, profile="smoke", overrides=["model.connector.num_querys=4"], registry=registry)


# ------------------------------------------------------------------------------ built and trained
def test_the_builder_wires_the_widths_and_each_image_costs_num_queries_tokens(registry):
    model = build_model(load_recipe(RECIPE, profile="smoke", registry=registry), registry)
    conn = model.connector
    assert isinstance(conn, PooledTokens)
    assert (conn.width_in, conn.width_out) == (model.encoder.width, model.decoder.width)
    assert model.tokens_per_image() == model.placeholder_tokens() == 4


def test_example_recipe_trains_and_the_loss_falls(registry, tmp_path):
    resolved = load_recipe(
        RECIPE, profile="smoke", overrides=["stages.align.max_steps=8", "stages.instruct.max_steps=8"], registry=registry
    )
    result = run(resolved, tmp_path / "run", registry=registry, progress=False)
    assert isinstance(result.model.connector, PooledTokens)
    assert [len(s.losses) for s in result.stages] == [8, 8]
    assert all(torch.isfinite(torch.tensor(s.losses)).all() for s in result.stages)
    assert result.stages[-1].losses[-1] < result.stages[0].losses[0]
