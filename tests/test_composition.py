"""Any connector with either fusion and two decoder families: the model builds from a recipe, runs
forward and backward on a batch with several images per sample, and only the trainable parts get
gradients. Plus paper-scale parameter counts of the projector (REFERENCE 1.2)."""

from __future__ import annotations

import pytest
import torch

from tiny import resolved_toy
from vlmkit.core.engine.step import answer_loss
from vlmkit.connectors.mlp import MLPConfig, MLPProjector
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import Collator
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.interfaces import Sample
from vlmkit.core.recipe.schema import StageTune
from vlmkit.core.tuning import apply_tuning

CONNECTORS = {
    "linear": {"name": "linear"},
    "mlp": {"name": "mlp", "projector": "mlp2x_gelu"},
    "perceiver": {"name": "perceiver", "num_latents": 4, "depth": 1, "heads": 2, "dim_head": 8, "max_num_media": 4},
    "qformer": {"name": "qformer", "num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                "intermediate_size": 64},
    "abstractor": {"name": "abstractor", "num_queries": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 2},
}
FUSIONS = {
    "prefix": {"name": "prefix"},
    "gated_cross_attention": {"name": "gated_cross_attention", "every_n_layers": 1, "heads": 2, "dim_head": 8},
}
DECODERS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
}


def _samples() -> list[Sample]:
    data = ToyCaptions(ToyCaptionsConfig(num_samples=3, image_size=32))
    a, b, c = data[0], data[1], data[2]
    two = Sample("two", images=[a.images[0], b.images[0]],
                 segments=[("<image>one ", False), ("<image>two", False), (" both", True)])
    return [two, c]


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_every_connector_with_both_fusions_and_two_decoders(tmp_path, connector, fusion, decoder):
    def mutate(data):
        data["model"]["connector"] = dict(CONNECTORS[connector])
        data["model"]["fusion"] = dict(FUSIONS[fusion])
        data["model"]["decoder"]["config"] = dict(DECODERS[decoder])

    model = build_model(resolved_toy(tmp_path, mutate))
    expected_width = 64 if fusion == "prefix" else model.encoder.width  # decoder vs encoder width
    assert model.connector.width_out == expected_width
    tune = StageTune.model_validate({"encoder": "frozen", "connector": "full", "fusion": "full", "decoder": "frozen"})
    apply_tuning(model, tune, "stages.0")
    collator = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens())
    batch = collator(_samples())
    out = model(**{k: v for k, v in batch.items() if k not in ("ids", "labels")})
    assert out.logits.shape[:2] == batch["input_ids"].shape
    loss = answer_loss(out.logits, batch["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("connector.") for n, _ in trainable)
    assert all(p.grad is not None for n, p in trainable if n.startswith("connector.")), "every connector weight learns"
    if fusion == "gated_cross_attention":
        assert any(n.startswith("fusion.") for n, _ in trainable)
        # gates start at 0: the blocks' inner weights get no gradient yet, the gates do
        gates = [p for n, p in trainable if n.startswith("fusion.") and "gate" in n]
        assert gates and all(p.grad is not None for p in gates)
    for n, p in model.named_parameters():
        if n.startswith(("encoder.", "decoder.")):
            assert p.grad is None, n


def test_llava15_projector_parameter_count_at_paper_scale():
    with torch.device("meta"):
        mlp = MLPProjector(MLPConfig(projector="mlp2x_gelu", width_in=1024, width_out=4096))
    assert sum(p.numel() for p in mlp.parameters()) == 20_979_712  # REFERENCE 1.2 (LLaVA-1.5, 7B)
