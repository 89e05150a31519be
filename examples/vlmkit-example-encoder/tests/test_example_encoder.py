"""Tests of the example plug-in: the encoder on its own, its registration, and a short training
run of the example recipe. They run whether or not the package is installed (see conftest.py).

Copy this file when you write your own plug-in: test the component directly, then through a
``Registry`` that holds only your plug-in (``entry_points=False``), so that the test does not depend
on what else is installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vlmkit import EncoderConfig, VisionEncoder
from vlmkit.core.errors import RecipeError
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import Registry
from vlmkit.core.engine import run
from vlmkit_example_encoder import plugin as plugin_module
from vlmkit_example_encoder.encoder import PatchEmbedConfig, PatchEmbedEncoder

RECIPE = Path(__file__).resolve().parents[1] / "recipe.yaml"


@pytest.fixture
def registry() -> Registry:
    return Registry(entry_points=False, plugins=[("example_encoder", plugin_module)])


# ------------------------------------------------------------------------------ the encoder itself
@pytest.mark.parametrize(
    ("patch_size", "width", "image_size", "tokens"),
    [(8, 64, 32, 16), (4, 16, 32, 64), (16, 8, 64, 16), (8, 24, 8, 1)],
)
def test_output_shape_matches_width_and_num_tokens(patch_size, width, image_size, tokens):
    enc = PatchEmbedEncoder(PatchEmbedConfig(patch_size=patch_size, width=width, image_size=image_size))
    assert isinstance(enc, VisionEncoder)
    assert enc.width == width
    assert enc.num_tokens() == tokens
    out = enc(torch.randn(3, 3, image_size, image_size))
    assert out.shape == (3, tokens, width)
    assert torch.isfinite(out).all()


def test_num_tokens_for_other_sizes_agrees_with_forward():
    enc = PatchEmbedEncoder(PatchEmbedConfig())
    for size in (8, 16, 40, 64):
        assert enc.num_tokens(size) == (size // 8) ** 2
        assert enc(torch.zeros(1, 3, size, size)).shape == (1, enc.num_tokens(size), 64)


def test_defaults_and_preprocess():
    cfg = PatchEmbedConfig()
    assert (cfg.patch_size, cfg.width, cfg.image_size) == (8, 64, 32)
    enc = PatchEmbedEncoder(PatchEmbedConfig(image_size=48, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))
    pre = enc.preprocess
    assert pre.image_size == 48
    assert pre.mean == (0.1, 0.2, 0.3) and pre.std == (0.4, 0.5, 0.6)


def test_tokens_are_layer_normed_and_learnable():
    enc = PatchEmbedEncoder(PatchEmbedConfig(width=32))
    out = enc(torch.randn(2, 3, 32, 32))
    # LayerNorm with its initial affine (1, 0): each token has mean 0 and unit variance
    assert torch.allclose(out.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)
    out.sum().backward()
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0


def test_config_is_an_encoder_config_that_rejects_unknown_keys():
    assert issubclass(PatchEmbedConfig, EncoderConfig)
    with pytest.raises(ValidationError, match="patch_sise"):
        PatchEmbedConfig.model_validate({"patch_sise": 4})
    with pytest.raises(ValidationError):
        PatchEmbedConfig(patch_size=0)
    with pytest.raises(ValidationError, match="not a multiple of patch_size"):
        PatchEmbedConfig(image_size=30, patch_size=8)


# ------------------------------------------------------------------------------ registration
def test_registry_lists_patch_embed_as_an_encoder(registry):
    assert "patch_embed" in registry.names("encoder")
    entry = registry.entry("encoder", "patch_embed")
    assert entry.provider.plugin == "example_encoder"
    assert entry.summary.startswith("A learnable patch embedding")
    assert registry.component_class("encoder", "patch_embed") is PatchEmbedEncoder
    assert entry.config_class is PatchEmbedConfig
    info = registry.plugins["example_encoder"]
    assert info.status == "loaded"
    assert info.hooks == ["register_encoders"]
    assert info.components == [("encoder", "patch_embed")]
    # the built-ins are still there next to it
    assert "timm" in registry.names("encoder")


def test_recipe_section_is_validated_against_the_config(registry):
    resolved = load_recipe(RECIPE, profile="smoke", registry=registry)
    assert resolved.recipe.name == "toy_patch_embed"
    spec = resolved.components["encoder"]
    assert spec.name == "patch_embed"
    assert isinstance(spec.config, PatchEmbedConfig)
    assert (spec.config.patch_size, spec.config.width, spec.config.image_size) == (8, 32, 32)
    # the parent's timm options are gone (the section was swapped, not merged)
    assert "model_name" not in resolved.data["model"]["encoder"]
    with pytest.raises(RecipeError, match=r"model\.encoder\.patch_sise: unknown field"):
        load_recipe(RECIPE, profile="smoke", overrides=["model.encoder.patch_sise=4"], registry=registry)


# ------------------------------------------------------------------------------ training
def test_example_recipe_trains_and_the_loss_falls(registry, tmp_path):
    resolved = load_recipe(
        RECIPE,
        profile="smoke",
        overrides=["stages.align.max_steps=8", "stages.instruct.max_steps=8"],
        registry=registry,
    )
    result = run(resolved, tmp_path / "run", registry=registry, progress=False)
    assert isinstance(result.model.encoder, PatchEmbedEncoder)
    assert [s.name for s in result.stages] == ["align", "instruct"]
    for stage in result.stages:
        assert len(stage.losses) == stage.steps == 8
        assert all(torch.isfinite(torch.tensor(stage.losses)))
        assert stage.losses[-1] < stage.losses[0], (stage.name, stage.losses)
    assert result.stages[-1].losses[-1] < result.stages[0].losses[0]
    assert (tmp_path / "run" / "recipe.yaml").is_file()
