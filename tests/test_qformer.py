"""The BLIP-2 Q-Former connector: parity with transformers' Blip2QFormerModel (used here only as an
oracle), BLIP-2-scale parameter counts, the hf_config path and its errors, shapes, gradients, and
composition in a recipe."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from tiny import resolved_toy
from vlmkit.core.engine.step import answer_loss
from vlmkit.connectors.qformer import QFormer, QFormerConfig
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import Collator
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.errors import VlmkitError


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ oracle key mapping
_ATTN_BLOCKS = {"self_attn": "attention", "cross_attn": "crossattention"}
_ATTN_PARTS = {"query": "attention.query", "key": "attention.key", "value": "attention.value",
               "out": "output.dense", "norm": "output.LayerNorm"}
_FFN_PARTS = {"fc1": "intermediate_query.dense", "fc2": "output_query.dense", "norm": "output_query.LayerNorm"}


def _hf_key(name: str) -> str:
    """Our Q-Former parameter name -> Blip2QFormerModel's."""
    if name.startswith("query_norm."):
        return "layernorm." + name.removeprefix("query_norm.")
    i, block, part, kind = re.fullmatch(r"layers\.(\d+)\.(\w+)\.(\w+)\.(weight|bias)", name).groups()
    if block == "ffn":
        return f"encoder.layer.{i}.{_FFN_PARTS[part]}.{kind}"
    return f"encoder.layer.{i}.{_ATTN_BLOCKS[block]}.{_ATTN_PARTS[part]}.{kind}"


def _copy_into_oracle(ours: QFormer, oracle: Blip2QFormerModel) -> None:
    """Copy every Q-Former tensor into the oracle; every oracle tensor must be written exactly once."""
    target = oracle.state_dict()
    written: list[str] = []
    for name, tensor in ours.state_dict().items():
        if name == "query_tokens" or name.startswith("projection."):
            continue  # outside Blip2QFormerModel: fed as query_embeds / applied afterwards
        key = _hf_key(name)
        assert key in target, f"{name} -> {key} is not an oracle tensor"
        assert target[key].shape == tensor.shape, key
        target[key].copy_(tensor)
        written.append(key)
    assert sorted(written) == sorted(target), "every oracle tensor is mapped exactly once"


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights far from BERT's small init (std 0.02) so that every path carries signal: Linear weights
    of std 1/sqrt(fan_in), biases 0.1, LayerNorm gains 1 +- 0.2, queries 0.5 (outputs of std ~1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name == "query_tokens":
                p.copy_(0.5 * noise)
            elif p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * noise)


TINY = [  # hidden, layers, heads, intermediate, cross_attention_frequency, width_in (encoder), width_out
    (32, 2, 2, 64, 2, 24, 40),
    (64, 4, 4, 96, 1, 48, 16),
    (48, 4, 3, 80, 3, 40, 32),
]


@pytest.mark.parametrize("hidden, layers, heads, inter, freq, width_in, width_out", TINY)
def test_parity_with_transformers_blip2_qformer(hidden, layers, heads, inter, freq, width_in, width_out):
    ours = QFormer(QFormerConfig(width_in=width_in, width_out=width_out, num_queries=6, hidden_size=hidden,
                                 num_layers=layers, num_heads=heads, intermediate_size=inter,
                                 cross_attention_frequency=freq)).eval()
    _randomise(ours, seed=hidden + freq)
    assert ours.cross_attention_layers == tuple(i for i in range(layers) if i % freq == 0)
    oracle = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        cross_attention_frequency=freq, encoder_hidden_size=width_in, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")).eval()
    _copy_into_oracle(ours, oracle)

    torch.manual_seed(0)
    feats = torch.randn(3, 7, width_in)
    with torch.no_grad():
        got = ours(feats)
        hidden_states = oracle(query_embeds=ours.query_tokens.expand(3, -1, -1), encoder_hidden_states=feats,
                               encoder_attention_mask=torch.ones(3, 7, dtype=torch.long)).last_hidden_state
        want = torch.nn.functional.linear(hidden_states, ours.projection.weight, ours.projection.bias)
        other = ours(torch.randn(3, 7, width_in))
    diff = (got - want).abs().max().item()
    print(f"parity hidden={hidden} layers={layers} freq={freq}: max abs diff {diff:.2e}")
    assert got.shape == want.shape == (3, 6, width_out)
    assert got.std() > 0.5, "outputs carry signal"
    assert diff <= 1e-5
    assert (other - got).abs().max() > 0.5, "the image features reach the output"


# ------------------------------------------------------------------------------- parameter counts
# BLIP-2 (Li et al. 2023) Table 2, "#Trainable Params" of the second stage: the Q-Former's query
# branch with its queries plus the projection to the LLM. Vision widths: EVA ViT-g/14 1408,
# CLIP ViT-L/14 1024; LLM widths: OPT-2.7B 2560, OPT-6.7B 4096, FlanT5-XL 2048, FlanT5-XXL 4096.
BLIP2_TRAINABLE = [  # (system, vision width, LLM width, millions)
    ("ViT-g OPT-2.7B", 1408, 2560, 107),
    ("ViT-g OPT-6.7B", 1408, 4096, 108),
    ("ViT-g FlanT5-XL", 1408, 2048, 107),
    ("ViT-g FlanT5-XXL", 1408, 4096, 108),
    ("ViT-L OPT-2.7B", 1024, 2560, 104),
    ("ViT-L FlanT5-XL", 1024, 2048, 103),
]


def _paper_counts(width_in: int, width_out: int) -> tuple[int, int]:
    """(ours, oracle + 32 queries + projection) at BLIP-2 scale, both built on the meta device."""
    with torch.device("meta"):
        ours = QFormer(QFormerConfig(width_in=width_in, width_out=width_out))
        oracle = Blip2QFormerModel(Blip2QFormerConfig(encoder_hidden_size=width_in))
        projection = torch.nn.Linear(768, width_out)
    assert ours.query_tokens.is_meta
    assert ours.cross_attention_layers == (0, 2, 4, 6, 8, 10)
    return _numel(ours), _numel(oracle) + 32 * 768 + _numel(projection)


@pytest.mark.parametrize("system, width_in, width_out, millions", BLIP2_TRAINABLE)
def test_blip2_scale_counts_equal_transformers_and_the_paper(system, width_in, width_out, millions):
    ours, oracle = _paper_counts(width_in, width_out)
    print(f"{system}: ours {ours:,}, transformers {oracle:,}")
    assert ours == oracle
    assert round(ours / 1e6) == millions


def test_reference_105m_is_the_vit_g_qformer_without_its_projection():
    """REFERENCE 1.4 says "about 105M parameters with the projection". At BLIP-2's configuration
    (ViT-g features, 1408) the Q-Former with its 32 queries has 105.16M, within 1% of that; the
    projection adds 1.97M (OPT-2.7B, 2560) or 1.57M (FlanT5-XL, 2048), giving 107.13M / 106.74M,
    the paper's 107M."""
    with torch.device("meta"):
        ours = QFormer(QFormerConfig(width_in=1408, width_out=2560))
    body = _numel(ours) - _numel(ours.projection)
    assert body == 105_162_240
    assert abs(body - 105e6) / 105e6 < 0.01
    assert _paper_counts(1408, 2560) == (107_130_880, 107_130_880)
    assert _paper_counts(1408, 2048) == (106_737_152, 106_737_152)


# ------------------------------------------------------------------------------------- hf_config
HF_TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 48,
           "cross_attention_frequency": 2}
FIELDS_TINY = {"hidden_size": 32, "num_layers": 3, "num_heads": 4, "intermediate_size": 48,
               "cross_attention_frequency": 2}


def _qformer(seed: int = 0, **fields) -> QFormer:
    torch.manual_seed(seed)
    return QFormer(QFormerConfig(width_in=24, width_out=40, num_queries=5, **fields))


def test_hf_config_builds_the_same_qformer():
    from_hf = _qformer(hf_config=HF_TINY | {"encoder_hidden_size": 24}).eval()
    from_fields = _qformer(**FIELDS_TINY).eval()
    assert from_hf.config.hf_config is not None and from_hf.hparams.hf_config is None
    assert from_hf.hparams.num_layers == 3 and from_hf.hparams.hidden_dropout == 0.1  # transformers' default
    assert from_fields.hparams.hidden_dropout == 0.0  # ours
    assert _numel(from_hf) == _numel(from_fields)
    oracle = Blip2QFormerModel(Blip2QFormerConfig(**HF_TINY, encoder_hidden_size=24))
    assert _numel(from_hf) == _numel(oracle) + 5 * 32 + 32 * 40 + 40
    a, b = from_hf.state_dict(), from_fields.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same init
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(from_hf(x), from_fields(x), rtol=0, atol=0)


def test_hf_config_takes_explicit_fields_and_width_in():
    q = _qformer(num_layers=2, hf_config={"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 48})
    assert len(q.layers) == 2 and q.cross_attention_layers == (0,)  # transformers' default frequency 2
    assert q.layers[0].cross_attn.key.in_features == 24  # encoder_hidden_size filled from width_in
    same = _qformer(hidden_size=32, hf_config=HF_TINY)  # an explicit field that agrees is fine
    assert same.hparams.hidden_size == 32


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"hf_config": HF_TINY | {"encoder_hidden_size": 1408}},
         r"model\.connector\.hf_config\.encoder_hidden_size: 1408 .* 24 \(model\.connector\.width_in\)"),
        ({"hidden_size": 64, "hf_config": HF_TINY},
         r"model\.connector\.hidden_size: 64 contradicts model\.connector\.hf_config\.hidden_size = 32"),
        ({"num_layers": 4, "hf_config": HF_TINY},
         r"model\.connector\.num_layers: 4 contradicts model\.connector\.hf_config\.num_hidden_layers = 3"),
        ({"hf_config": HF_TINY | {"hiden_act": "gelu"}},
         r"model\.connector\.hf_config\.hiden_act: not a transformers.Blip2QFormerConfig key; "
         r"did you mean 'hidden_act'"),
        ({"hf_config": HF_TINY | {"hidden_act": "relu"}}, r"model\.connector\.hf_config\.hidden_act: 'relu'"),
        ({"hf_config": HF_TINY | {"use_qformer_text_input": True}},
         r"model\.connector\.hf_config\.use_qformer_text_input"),
        ({"hf_config": HF_TINY | {"model_type": "bert"}}, r"model\.connector\.hf_config\.model_type"),
        ({"hf_config": HF_TINY | {"num_hidden_layers": 0}},
         r"model\.connector\.hf_config\.num_hidden_layers: .*greater than 0"),
        ({"hf_config": HF_TINY | {"num_attention_heads": 5}},
         r"model\.connector\.hf_config\.num_attention_heads: 5 attention heads do not divide the hidden size 32 "
         r"\(model\.connector\.hf_config\.hidden_size\)"),
        (FIELDS_TINY | {"num_heads": 5},
         r"model\.connector\.num_heads: 5 attention heads do not divide the hidden size 32 "
         r"\(model\.connector\.hidden_size\)"),
    ],
)
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(VlmkitError, match=match):
        _qformer(**fields)


def test_recipe_hf_config_width_mismatch_is_a_build_error(tmp_path):
    def mutate(data):
        data["model"]["connector"] = {"name": "qformer", "num_queries": 4,
                                      "hf_config": HF_TINY | {"encoder_hidden_size": 1408}}

    resolved = resolved_toy(tmp_path, mutate)  # loads: the widths meet only when the model is built
    with pytest.raises(VlmkitError, match=r"model\.connector\.hf_config\.encoder_hidden_size: 1408 .* 32"):
        build_model(resolved)


# ------------------------------------------------------------------------------ shapes, gradients
def test_shapes_frames_and_dtype():
    q = _qformer(**FIELDS_TINY)
    assert q.num_queries(16) == q.num_queries(196, num_frames=8) == 5
    for tokens in (1, 16, 50):
        assert q(torch.randn(3, tokens, 24)).shape == (3, 5, 40)
    assert q(torch.randn(2, 4 * 9, 24), num_frames=4, media_positions=torch.tensor([0, 1])).shape == (2, 5, 40)
    assert q(torch.randn(2, 9, 24, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(N, tokens, 24\)"):
        q(torch.randn(2, 9, 32))


def test_gradients_reach_every_parameter_unless_frozen():
    q = _qformer(**FIELDS_TINY)
    feats = torch.randn(2, 9, 24, requires_grad=True)
    (q(feats) * torch.randn(2, 5, 40)).sum().backward()
    missing = [n for n, p in q.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert feats.grad.abs().sum() > 0

    q.requires_grad_(False)
    q.zero_grad(set_to_none=True)
    feats = torch.randn(2, 9, 24, requires_grad=True)
    (q(feats) * torch.randn(2, 5, 40)).sum().backward()
    assert all(p.grad is None for p in q.parameters())
    assert feats.grad.abs().sum() > 0  # a frozen Q-Former still passes gradients to a trained encoder


def test_dropout_acts_in_training_only():
    q = _qformer(**FIELDS_TINY, hidden_dropout=0.3, attention_dropout=0.3)
    x = torch.randn(2, 9, 24)
    q.train()
    assert not torch.equal(q(x), q(x))
    q.eval()
    assert torch.equal(q(x), q(x))


# ----------------------------------------------------------------------------------- composition
def test_composes_in_a_recipe_with_the_prefix_fusion(tmp_path):
    def mutate(data):
        data["model"]["connector"] = {"name": "qformer", "num_queries": 4, "hidden_size": 32, "num_layers": 2,
                                      "num_heads": 2, "intermediate_size": 64}

    model = build_model(resolved_toy(tmp_path, mutate))
    assert isinstance(model.connector, QFormer)
    widths = (model.connector.width_in, model.connector.width_out)
    assert widths == (model.encoder.width, model.decoder.width) == (32, 64)
    assert model.encoder.num_tokens() == 16 and model.placeholder_tokens() == 4

    data = ToyCaptions(ToyCaptionsConfig(num_samples=2, image_size=32))
    collate = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens())
    batch = collate([data[0], data[1]])
    assert int((batch["input_ids"] == collate.image_token_id).sum()) == 2 * 4
    loss = answer_loss(model(**{k: v for k, v in batch.items() if k not in ("ids", "labels")}).logits, batch["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())
