"""The plug-in contract as `vlmkit` exports it: the evaluator types and text markers, the connector's
``num_queries`` checked against its real output when the model is built, and the dataset's
bad-record report as part of the ``Dataset`` interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlmkit
from tiny import resolved_toy
from vlmkit import Connector, ConnectorConfig, Dataset, DatasetConfig, hookimpl
from vlmkit.core import interfaces
from vlmkit.core.compose import build_model
from vlmkit.core.data.rendered import RenderedDataset
from vlmkit.core.errors import VlmkitError
from vlmkit.core.registry import Registry

PACKAGE = Path(vlmkit.__file__).resolve().parent


def test_vlmkit_exports_the_evaluator_contract_and_the_markers():
    for name in ("Evaluator", "EvaluatorConfig", "EvalContext", "EvalResult", "IMAGE_TOKEN", "END_OF_CHUNK"):
        assert name in vlmkit.__all__
        assert getattr(vlmkit, name) is getattr(interfaces, name)
    assert (vlmkit.IMAGE_TOKEN, vlmkit.END_OF_CHUNK) == ("<image>", "<|endofchunk|>")


def test_the_markers_are_written_once():
    # every other module imports them; the recipe schema's field description quotes them as an example
    for literal in ('"<image>"', '"<|endofchunk|>"'):
        where = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if literal in p.read_text(encoding="utf-8"))
        assert where == ["core/interfaces.py", "core/recipe/schema.py"], (literal, where)


class CountedPool(Connector):
    """Mean of token pairs, then a projection: ``T`` tokens -> ``T // 2``, unless ``lie`` says otherwise."""

    class Config(ConnectorConfig):
        lie: int = 0

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(self.width_in, self.width_out)
        self.drop = torch.nn.Dropout(0.5)

    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        return num_frames * num_tokens_in // 2 + self.config.lie

    def forward(self, features, num_frames=1, media_positions=None):
        n, t, w = features.shape
        return self.drop(self.proj(features[:, : t // 2 * 2].reshape(n, t // 2, 2, w).mean(2)))


class PoolPlugin:
    @hookimpl
    def register_connectors(self, register):
        register("counted_pool", CountedPool)


def pool_recipe(tmp_path, registry, lie=0):
    def mutate(data):
        data["model"]["connector"] = {"name": "counted_pool", "lie": lie}

    return resolved_toy(tmp_path, mutate, registry=registry)


def test_a_connector_whose_num_queries_disagrees_with_its_output_fails_at_build_time(tmp_path):
    reg = Registry(entry_points=False, plugins=[("pool", PoolPlugin())])
    with pytest.raises(VlmkitError) as err:
        build_model(pool_recipe(tmp_path, reg, lie=1), reg)
    msg = str(err.value)
    assert msg.startswith("model.connector: connector 'counted_pool'") and "CountedPool" in msg
    assert "num_queries must count the tokens forward returns" in msg


def test_the_dry_forward_leaves_the_model_and_the_random_state_as_they_were(tmp_path):
    reg = Registry(entry_points=False, plugins=[("pool", PoolPlugin())])
    resolved = pool_recipe(tmp_path, reg)
    model = build_model(resolved, reg)
    after = torch.random.get_rng_state()
    tokens = model.encoder.num_tokens()
    assert model.tokens_per_image() == tokens // 2
    assert model.connector.training and model.connector.drop.training  # modes restored
    # the same build without the check (the connector constructed last, nothing drawn after it)
    # ends in the same random state: the dry forward (dropout in train mode would draw) drew nothing
    import vlmkit.core.compose as compose

    original = compose.check_connector_output
    compose.check_connector_output = lambda *args: None
    try:
        again = build_model(resolved, reg)
    finally:
        compose.check_connector_output = original
    assert torch.equal(torch.random.get_rng_state(), after)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


class Quiet(Dataset):
    Config = DatasetConfig

    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise IndexError(index)


def test_a_dataset_reports_nothing_skipped_by_default_and_the_pipeline_asks_the_interface():
    ds = Quiet(DatasetConfig())
    assert ds.error_report() == {} and ds.summary() == ""
    assert RenderedDataset(ds, None, None, "quiet").summary() == ""

    class Skipper(Quiet):
        def error_report(self):
            return {"missing_image": ["a", "b"]}

        def summary(self):
            return "quiet: skipped 2 records (missing_image 2): first ids a, b"

    assert RenderedDataset(Skipper(DatasetConfig()), None, None, "quiet").summary().startswith("quiet: skipped 2")
