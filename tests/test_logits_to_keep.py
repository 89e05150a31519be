"""Training projects onto the vocabulary only the positions that predict a trained token: the
kept logits equal the full ones there, and a run's losses are the same as with every position."""

from __future__ import annotations

import pytest
import torch

from tiny import resolved_toy
from vlmkit.core.compose import build_model
from vlmkit.core.engine import run
from vlmkit.decoders.hf_causal_lm import HFCausalLM


def test_kept_logits_equal_the_full_logits_at_those_positions(tmp_path):
    model = build_model(resolved_toy(tmp_path)).eval()
    decoder = model.decoder
    assert decoder.supports_logits_to_keep
    torch.manual_seed(0)
    embeds = torch.randn(3, 11, decoder.width)
    mask = torch.ones(3, 11, dtype=torch.long)
    keep = torch.rand(3, 11) > 0.6
    with torch.no_grad():
        full = decoder(inputs_embeds=embeds, attention_mask=mask).logits  # (3, 11, V)
        kept = decoder(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits  # (n, V)
    assert kept.shape == (int(keep.sum()), full.shape[-1])
    assert torch.allclose(kept, full[keep], atol=1e-5)


@pytest.mark.parametrize("recipe_fusion", ["prefix", "gated_cross_attention"])
def test_a_run_has_the_same_losses_with_and_without_it(tmp_path, monkeypatch, recipe_fusion):
    def mutate(data):
        if recipe_fusion == "gated_cross_attention":
            data["model"]["connector"] = {"name": "perceiver", "num_latents": 4, "depth": 1, "heads": 2, "dim_head": 8}
            data["model"]["fusion"] = {"name": "gated_cross_attention", "every_n_layers": 1, "heads": 2, "dim_head": 8,
                                       "gate_init": 0.5}

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    fast = run(resolved_toy(tmp_path / "a", mutate), tmp_path / "fast", progress=False)
    monkeypatch.setattr(HFCausalLM, "supports_logits_to_keep", property(lambda self: False))
    slow = run(resolved_toy(tmp_path / "b", mutate), tmp_path / "slow", progress=False)
    for a, b in zip(fast.stages, slow.stages):
        assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-6)
    assert any(len(s.losses) > 1 for s in fast.stages)
