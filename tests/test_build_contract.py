"""The plug-in contract for building and weight loading (vlmkit.core.interfaces): a third-party
encoder that reads its weights in ``load_weights`` is built on the meta device without reading
them, so ``recipes params`` counts it, and built for real with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from vlmkit import hookimpl
from vlmkit.core.compose import build_model
from vlmkit.core.interfaces import BuildContext, EncoderConfig, Preprocess, VisionEncoder
from vlmkit.core.params import stage_parameters
from vlmkit.core.recipe.loader import find_recipe, validate_mapping
from vlmkit.core.registry import Registry

#: every call of the third-party encoder's weight reading, with the device its parameters were on
READS: list[str] = []


class FileWeightsConfig(EncoderConfig):
    weights: str
    width: int = 24
    patch: int = 8


class FileWeightsEncoder(VisionEncoder):
    """A third party's encoder: a patch embedding whose weights come from its own file format
    (a safetensors file read by hand in ``load_weights``)."""

    Config = FileWeightsConfig

    def __init__(self, config: FileWeightsConfig):
        super().__init__(config)
        self.embed = nn.Conv2d(3, config.width, config.patch, stride=config.patch)  # 3*p*p*w + w

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def num_tokens(self, image_size: int | None = None) -> int:
        return ((image_size or 32) // self.config.patch) ** 2

    def load_weights(self) -> None:
        from safetensors.torch import load_file

        READS.append(self.embed.weight.device.type)
        self.embed.load_state_dict(load_file(self.config.weights))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(pixels).flatten(2).transpose(1, 2)  # (N, tokens, width)


class ThirdPartyPlugin:
    @hookimpl
    def register_encoders(self, register):
        register("file_weights", FileWeightsEncoder)


def _registry() -> Registry:
    return Registry(entry_points=False, plugins=[("third_party", ThirdPartyPlugin())])


def _resolved(weights: Path, registry: Registry):
    data = yaml.safe_load(find_recipe("toy_prefix").read_text(encoding="utf-8"))
    data["model"]["encoder"] = {"name": "file_weights", "weights": str(weights)}
    return validate_mapping(data, "third-party.yaml", registry=registry)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(3)
    embed = nn.Conv2d(3, 24, 8, stride=8)
    path = tmp_path / "embed.safetensors"
    save_file({k: v.contiguous() for k, v in embed.state_dict().items()}, str(path))
    return path


def test_a_third_party_encoder_builds_on_meta_without_reading_its_weights(weights: Path) -> None:
    registry = _registry()
    resolved = _resolved(weights, registry)
    READS.clear()
    stages = stage_parameters(resolved, registry)
    assert READS == []  # load_weights never ran on the meta device
    expected = 3 * 8 * 8 * 24 + 24
    for _, report in stages:
        assert report["encoder"]["trainable"] + report["encoder"]["frozen"] == expected
    assert [r["encoder"]["frozen"] for _, r in stages] == [expected, expected]  # frozen in both stages
    # the meta build holds no storage; the missing file would not even be noticed there
    weights.unlink()
    READS.clear()
    model = build_model(resolved, registry, meta=True)
    assert READS == [] and model.encoder.embed.weight.is_meta


def test_a_third_party_encoder_reads_its_weights_in_a_real_build(weights: Path) -> None:
    from safetensors.torch import load_file

    registry = _registry()
    resolved = _resolved(weights, registry)
    READS.clear()
    model = build_model(resolved, registry)
    assert READS == ["cpu"]  # once, after construction, on a real device
    torch.testing.assert_close(model.encoder.embed.weight, load_file(str(weights))["weight"], rtol=0, atol=0)


def test_the_default_build_is_construct_then_load_weights(weights: Path) -> None:
    config = FileWeightsConfig(weights=str(weights))
    READS.clear()
    with torch.device("meta"):
        FileWeightsEncoder.build(config, BuildContext(meta=True))
    assert READS == []
    FileWeightsEncoder.build(config, BuildContext())
    assert READS == ["cpu"]
