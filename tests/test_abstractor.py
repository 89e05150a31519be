"""The ``abstractor`` connector (mPLUG-Owl's visual abstractor): a hand-written oracle of its
layers, paper-scale size, the end-of-image token, invariances, gradients, errors and composition in
a recipe with the prefix fusion."""

from __future__ import annotations

import math

import pytest
import torch

from tiny import resolved_toy
from vlmkit.core.engine.step import answer_loss
from vlmkit.connectors.abstractor import AbstractorConfig, VisualAbstractor
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import Collator
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.core.interfaces import Sample

# width_in != hidden_size, so the input projection exists; eps values unlike the defaults
TINY = dict(width_in=12, width_out=20, num_queries=4, num_layers=2, hidden_size=16, num_heads=2,
            intermediate_size=24, layer_norm_eps=1e-3, block_layer_norm_eps=1e-2)


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> VisualAbstractor:
    """A tiny abstractor, in eval mode, with every parameter perturbed so that each one matters
    (LayerNorms start at 1/0, biases at 0) and attention is far from uniform."""
    torch.manual_seed(seed)
    model = VisualAbstractor(AbstractorConfig(**(TINY | overrides))).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.4 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------------- oracle
def _layer_norm(t: torch.Tensor, norm: torch.nn.LayerNorm, eps: float) -> torch.Tensor:
    mean = t.mean(-1, keepdim=True)
    var = (t - mean).square().mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def _linear(t: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return t @ lin.weight.T + lin.bias


def _manual_layer(layer, x: torch.Tensor, v: torch.Tensor, heads: int, eps: float, inner_eps: float) -> torch.Tensor:
    """mPLUG-Owl's abstractor layer written out: queries ``x (N, Q, H)``, visual tokens ``v (N, M, H)``."""
    q_in = _layer_norm(x, layer.norm_queries, eps)
    kv = torch.cat([q_in, _layer_norm(v, layer.norm_visual, eps)], dim=1)  # keys/values: [queries; visual]
    q, k, val = _linear(q_in, layer.query), _linear(kv, layer.key), _linear(kv, layer.value)
    d = q.shape[-1] // heads
    heads_out = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(d)  # (N, Q, Q + M)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        heads_out.append(weights @ val[..., cols])
    y = q_in + _linear(torch.cat(heads_out, dim=-1), layer.out_proj)  # residual from the normalised queries
    z = _layer_norm(y, layer.norm_ffn, eps)
    gate = _linear(z, layer.ffn.w1)
    hidden = gate * torch.sigmoid(gate) * _linear(z, layer.ffn.w3)  # SiLU(W1 z) * W3 z
    return y + _linear(_layer_norm(hidden, layer.ffn.inner_norm, inner_eps), layer.ffn.w2)


def test_one_layer_and_the_whole_connector_match_the_hand_written_formula():
    # float64: rounding (~1e-6 relative in float32 at these output magnitudes) stays far below the
    # 1e-5 bar, so any difference is a difference of formula
    model = _tiny(dtype=torch.float64)
    heads, eps, inner_eps = TINY["num_heads"], TINY["block_layer_norm_eps"], TINY["layer_norm_eps"]
    torch.manual_seed(1)
    x = torch.randn(3, TINY["num_queries"], TINY["hidden_size"], dtype=torch.float64)
    v = torch.randn(3, 7, TINY["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        layer = model.layers[0]
        got = layer(x, v)
        want = _manual_layer(layer, x, v, heads, eps, inner_eps)
        # the attention is not near-uniform, so the check sees the scores
        s = _linear(layer.norm_queries(x), layer.query)[..., :8] @ _linear(layer.norm_visual(v), layer.key)[..., :8].transpose(1, 2)
        assert (s.amax(-1) - s.amin(-1)).min() > 1.0
    assert got.shape == (3, TINY["num_queries"], TINY["hidden_size"])
    diff = (got - want).abs().max().item()
    print(f"one layer vs hand-written formula: max|diff| = {diff:.2e}")
    assert diff <= 1e-5

    features = torch.randn(3, 2 * 5, TINY["width_in"], dtype=torch.float64)
    with torch.no_grad():
        got = model(features, num_frames=2)
        visual = _linear(features, model.visual_proj)
        h = model.queries.expand(3, -1, -1)
        for layer in model.layers:
            h = _manual_layer(layer, h, visual, heads, eps, inner_eps)
        want = torch.cat([_linear(h, model.proj), model.end_of_image.expand(3, 1, -1)], dim=1)
    assert got.shape == (3, TINY["num_queries"] + 1, TINY["width_out"])
    diff = (got - want).abs().max().item()
    print(f"whole connector vs hand-written formula: max|diff| = {diff:.2e}")
    assert diff <= 1e-5


# ------------------------------------------------------------------------ size and tokens
def test_defaults_are_mplug_owl_and_give_65_tokens():
    with torch.device("meta"):
        model = VisualAbstractor(AbstractorConfig(width_in=1024, width_out=4096))
        out = model(torch.empty(2, 257, 1024))  # CLIP ViT-L/14 at 224 px: 256 patches + CLS
    assert out.shape == (2, 65, 4096)
    assert model.num_queries(257) == 65 == model.num_queries(256, num_frames=4)
    assert model.visual_proj is None  # encoder width == hidden size: the reference's structure exactly
    layer = model.layers[0]
    assert len(model.layers) == 6 and layer.heads == 16
    assert layer.ffn.w1.weight.shape == (2816, 1024) and layer.ffn.w2.weight.shape == (1024, 2816)
    assert layer.norm_queries.eps == layer.norm_visual.eps == layer.norm_ffn.eps == 1e-5
    assert layer.ffn.inner_norm.eps == 1e-6
    assert model.config.attention_dropout == 0.1


def test_paper_scale_parameter_count():
    with torch.device("meta"):
        model = VisualAbstractor(AbstractorConfig(width_in=1024, width_out=4096))
    n = sum(p.numel() for p in model.parameters())
    # the reference's modules, counted by hand: H = 1024, I = 2816, LLaMA-7B width 4096
    H, I, D = 1024, 2816, 4096
    linear = lambda i, o: i * o + o  # noqa: E731
    per_layer = (3 * 2 * H  # norm1 (queries), normk (keys), norm2 (before the FFN)
                 + 3 * linear(H, H) + linear(H, H)  # query, key, value, out_proj
                 + 2 * linear(H, I) + 2 * I + linear(I, H))  # w1, w3, ffn_ln, w2
    expected = 6 * per_layer + 64 * H + linear(H, D) + D  # layers, query_tokens, visual_fc, vit_eos
    print(f"abstractor parameters at paper scale: {n:,} (per layer {per_layer:,})")
    assert per_layer == 12_867_584
    assert n == expected == 81_473_536
    with torch.device("meta"):
        wider = VisualAbstractor(AbstractorConfig(width_in=1408, width_out=4096))  # e.g. EVA ViT-g features
    assert sum(p.numel() for p in wider.parameters()) - n == linear(1408, H)  # only the input projection


# -------------------------------------------------------------------- end-of-image token
def test_end_of_image_is_the_last_token_whatever_the_input():
    model = _tiny()
    a, b = torch.randn(2, 9, TINY["width_in"]), 3 * torch.randn(3, 30, TINY["width_in"])
    with torch.no_grad():
        out_a, out_b = model(a), model(b)
    for out in (out_a, out_b):
        assert out.shape[1:] == (TINY["num_queries"] + 1, TINY["width_out"])
        torch.testing.assert_close(out[:, -1], model.end_of_image.expand(out.shape[0], -1), rtol=0, atol=0)
    # the query tokens do depend on the image
    assert (out_a[0, :-1] - out_b[0, :-1]).abs().amin(-1).min() > 1e-4
    with torch.no_grad():
        model.end_of_image.add_(1.0)
        moved = model(a)
    torch.testing.assert_close(moved[:, :-1], out_a[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(moved[:, -1], out_a[:, -1] + 1.0)


# ------------------------------------------------------------------------------ invariances
def test_outputs_depend_on_every_visual_token_but_not_on_their_order():
    model = _tiny()
    x = torch.randn(2, 11, TINY["width_in"])
    with torch.no_grad():
        out = model(x)
        permuted = model(x[:, torch.randperm(11)])
        nudged = x.clone()
        nudged[:, 5] += 1.0
        changed = model(nudged)
    # no positional embeddings (mPLUG-Owl v1): attention over a set of keys ignores their order
    torch.testing.assert_close(permuted, out, atol=1e-5, rtol=1e-5)
    # one visual token changed: every query token moves, the end-of-image token does not
    assert (changed[:, :-1] - out[:, :-1]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(changed[:, -1], out[:, -1], rtol=0, atol=0)


def test_batched_equals_one_image_at_a_time_and_frames_are_one_key_sequence():
    model = _tiny()
    x = torch.randn(4, 3 * 5, TINY["width_in"])  # 3 frames of 5 tokens
    with torch.no_grad():
        batched = model(x, num_frames=3)
        single = torch.cat([model(x[i : i + 1], num_frames=3) for i in range(4)])
        merged = model(x, num_frames=1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, batched, rtol=0, atol=0)


def test_attention_dropout_acts_only_in_training():
    model = _tiny(attention_dropout=0.5)
    x = torch.randn(2, 9, TINY["width_in"])
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        first, second = model(x), model(x)
    assert not torch.allclose(first[:, :-1], second[:, :-1], atol=1e-4)
    torch.testing.assert_close(first[:, -1], second[:, -1], rtol=0, atol=0)


# ------------------------------------------------------------------------------- gradients
def test_gradients_reach_every_parameter_and_none_when_frozen():
    model = _tiny(dtype=torch.float64).train()  # float64: the key bias's exact-zero gradient shows
    torch.manual_seed(2)
    x = torch.randn(3, 2 * 6, TINY["width_in"], dtype=torch.float64)
    out = model(x, num_frames=2)
    (out * torch.randn_like(out)).sum().backward()
    names = {n for n, _ in model.named_parameters()}
    assert {"queries", "end_of_image", "visual_proj.weight", "proj.weight", "layers.1.ffn.inner_norm.weight"} <= names
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        if name.endswith("key.bias"):
            # the key bias adds the same score to every key of a query: it cancels in the softmax
            assert p.grad.abs().max() < 1e-10, f"{name} gets a gradient {p.grad.abs().max():.2e}"
        else:
            assert p.grad.abs().max() > 1e-4, f"zero gradient for {name}"

    frozen = _tiny().requires_grad_(False)
    x = torch.randn(2, 6, TINY["width_in"], requires_grad=True)
    frozen(x).sum().backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0  # the encoder behind it can still train


# ---------------------------------------------------------------------------------- errors
def test_errors_name_the_recipe_field(tmp_path):
    with pytest.raises(VlmkitError, match=r"model\.connector\.num_heads: 3 attention heads .* 16"):
        VisualAbstractor(AbstractorConfig(**(TINY | {"num_heads": 3})))

    def bad_heads(data):
        data["model"]["connector"] = {"name": "abstractor", "hidden_size": 30, "num_heads": 4}

    with pytest.raises(VlmkitError, match=r"model\.connector\.num_heads"):
        build_model(resolved_toy(tmp_path, bad_heads))

    def typo(data):
        data["model"]["connector"] = {"name": "abstractor", "num_query": 8}

    with pytest.raises(RecipeError, match=r"model\.connector\.num_query.*num_queries"):
        resolved_toy(tmp_path, typo)

    def bad_dropout(data):
        data["model"]["connector"] = {"name": "abstractor", "attention_dropout": 1.0}

    with pytest.raises(RecipeError, match=r"model\.connector\.attention_dropout"):
        resolved_toy(tmp_path, bad_dropout)

    model = _tiny()
    with pytest.raises(ValueError, match=r"features \(N, tokens, 12\)"):
        model(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="num_frames=3"):
        model(torch.randn(1, 8, TINY["width_in"]), num_frames=3)


# ----------------------------------------------------------------------------- composition
def _samples():
    data = ToyCaptions(ToyCaptionsConfig(num_samples=3, image_size=32))
    a, b = data[0], data[1]
    two = Sample("two", images=[a.images[0], b.images[0]],
                 segments=[("<image>first ", False), ("<image>second", False), (" both shapes", True)])
    return [two, data[2]]


def test_composes_with_prefix_fusion(tmp_path):
    def mutate(data):
        data["model"]["connector"] = {"name": "abstractor", "num_queries": 4, "num_layers": 2, "hidden_size": 32,
                                      "num_heads": 2, "intermediate_size": 64}

    model = build_model(resolved_toy(tmp_path, mutate))
    conn = model.connector
    assert isinstance(conn, VisualAbstractor)
    assert (conn.width_in, conn.width_out) == (32, 64)  # timm ViT width -> tiny Llama width
    assert conn.visual_proj is None  # encoder width 32 == hidden_size 32
    assert model.placeholder_tokens() == 5  # 4 queries + the end-of-image vector
    col = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens())
    batch = {k: v for k, v in col(_samples()).items() if k != "ids"}
    assert int((batch["input_ids"] == col.image_token_id).sum()) == 3 * 5
    model.encoder.requires_grad_(False)
    model.decoder.requires_grad_(False)
    loss = answer_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None, f"no gradient for connector.{name}"
        if not name.endswith("key.bias"):
            assert p.grad.abs().sum() > 0, f"zero gradient for connector.{name}"
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())
    with torch.no_grad():
        media = model.encode_media(batch["vision_x"], batch["media_mask"])  # (B, T_img, 5, 64)
    real = media[batch["media_mask"]]  # (3, 5, 64)
    assert real.shape == (3, 5, 64)
    torch.testing.assert_close(real[:, -1], conn.end_of_image.detach().expand(3, -1), rtol=0, atol=0)
    assert not torch.allclose(real[0, :-1], real[1, :-1], atol=1e-4)  # two different images
