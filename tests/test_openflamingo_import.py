"""The OpenFlamingo importer: a tiny random OpenFlamingo ``Flamingo`` (open_clip ViT, perceiver, a Llama
with gated cross-attention every 2 layers) imported into the equivalent vlmkit model gives the same
logits; plus the mapping's errors and file loading."""

from __future__ import annotations

import copy

import pytest
import torch

from tiny import resolved_toy
from vlmkit.core.compose import build_model
from vlmkit.core.errors import VlmkitError
from vlmkit.core.importers.openflamingo import (
    IGNORED,
    TokenNormWarning,
    import_openflamingo,
    map_openflamingo_state_dict,
)

open_clip = pytest.importorskip("open_clip")
of_flamingo = pytest.importorskip("open_flamingo.src.flamingo")
of_lm = pytest.importorskip("open_flamingo.src.flamingo_lm")
of_utils = pytest.importorskip("open_flamingo.src.utils")

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
TEXT = {"width": 16, "heads": 2, "layers": 1}
EOC = "<|endofchunk|>"


def _vlmkit(tmp_path, every_n_layers=2, ln_post=False):
    def mutate(data):
        model = data["model"]
        # ln_post false: the tokens OpenFlamingo was trained on (open_clip 2.16-2.20, see _openflamingo)
        model["encoder"] = {"name": "open_clip", "model_name": "ViT-B-32", "ln_post": ln_post,
                            "model_cfg": {"vision_cfg": dict(VISION), "text_cfg": dict(TEXT)}}
        # OpenFlamingo's Flamingo builds PerceiverResampler(dim=vis_dim) with its defaults
        model["connector"] = {"name": "perceiver", "num_latents": 64, "depth": 6, "heads": 8, "dim_head": 64,
                              "ff_mult": 4}
        # and GatedCrossAttentionBlock(dim, dim_visual) with its defaults
        model["fusion"] = {"name": "gated_cross_attention", "every_n_layers": every_n_layers, "heads": 8,
                           "dim_head": 64, "ff_mult": 4, "only_attend_immediate_media": True}
        model["decoder"]["config"]["num_hidden_layers"] = 4
        model["decoder"]["special_tokens"] = [EOC]

    return build_model(resolved_toy(tmp_path, mutate)).eval()


def _openflamingo(ours, old_open_clip=True):
    """OpenFlamingo's Flamingo assembled as its factory does, offline: same vision architecture, the
    same Llama config (vocabulary included) and the same <image> / <|endofchunk|> ids; weights random.

    ``old_open_clip``: the vision tower returns its tokens as open_clip 2.16-2.20 did for OpenFlamingo's
    training (``ln_post`` on the pooled output only: open_clip 3.x's ``final_ln_after_pool``);
    false: as the installed open_clip does by default (``ln_post`` on every token)."""
    torch.manual_seed(1)
    base = open_clip.get_model_config("ViT-B-32")
    clip = open_clip.create_model(
        "ViT-B-32", pretrained=None, force_image_size=VISION["image_size"],
        vision_cfg={**base["vision_cfg"], **VISION}, text_cfg={**base["text_cfg"], **TEXT},
    )
    clip.visual.output_tokens = True
    if old_open_clip:
        assert hasattr(clip.visual, "final_ln_after_pool")  # open_clip 3.x's switch for the old behaviour
        clip.visual.final_ln_after_pool = True
    from transformers import LlamaForCausalLM

    lang = LlamaForCausalLM(copy.deepcopy(ours.decoder.model.config))
    of_utils.extend_instance(lang, of_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    tok = ours.decoder.tokenizer
    ref = of_flamingo.Flamingo(
        clip, lang, eoc_token_id=tok.convert_tokens_to_ids(EOC), media_token_id=tok.convert_tokens_to_ids("<image>"),
        vis_dim=VISION["width"], cross_attn_every_n_layers=2,
    ).eval()
    with torch.no_grad():  # LayerNorms start at 1/0 and gates at 0: perturb everything so every tensor matters
        for name, p in ref.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.copy_(torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def _inputs(ours):
    tok = ours.decoder.tokenizer
    image, eoc = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids(EOC)
    g = torch.Generator().manual_seed(2)
    L = 20
    ids = torch.randint(0, 250, (2, L), generator=g)  # plain bytes
    ids[0, [0, 9]] = image  # an image first, a second one mid-sentence
    ids[0, [8, 19]] = eoc
    ids[1, [3, 12]] = image  # text before the first image (no media to attend)
    ids[1, [11, 16]] = eoc
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 17:] = 0  # right padding
    ids[1, 17:] = tok.pad_token_id
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=g)  # (B, T_img, F, C, H, W)
    return ids, mask, vision_x


@pytest.mark.parametrize("old_open_clip", [True, False], ids=["open_clip-2.20-tokens", "ln_post-tokens"])
def test_logits_match_open_flamingo(tmp_path, old_open_clip):
    ours = _vlmkit(tmp_path, ln_post=not old_open_clip)
    ref = _openflamingo(ours, old_open_clip)
    of_state = ref.state_dict()
    assert any(".gated_cross_attn_layer." in k for k in of_state)  # the layouts this importer maps
    assert any(k.startswith("lang_encoder.gated_cross_attn_layers.") for k in of_state)
    assert any(k.startswith("lang_encoder.old_decoder_blocks.") for k in of_state)

    if old_open_clip:
        loaded = import_openflamingo(ours, of_state)
    else:  # the perceiver was trained on tokens without ln_post: a model that normalises them is warned
        with pytest.warns(TokenNormWarning, match="ln_post: false"):
            loaded = import_openflamingo(ours, of_state)
    # every tensor of the vlmkit model came from the checkpoint
    assert set(loaded) == set(ours.state_dict()), set(ours.state_dict()) ^ set(loaded)
    ids, mask, vision_x = _inputs(ours)
    with torch.no_grad():
        expected = ref(vision_x, ids, attention_mask=mask).logits
        got = ours(ids, mask, vision_x, torch.ones(2, 2, dtype=torch.bool)).logits
    diff = (got - expected).abs().max().item()
    print(f"max abs logit difference vs OpenFlamingo: {diff:.3e}")
    assert diff < 1e-5, diff
    # the images matter: the same text with other images gives other logits
    with torch.no_grad():
        other = ours(ids, mask, torch.randn_like(vision_x), torch.ones(2, 2, dtype=torch.bool)).logits
    assert (other - got).abs().max() > 1e-3


def test_released_checkpoint_layout_from_files(tmp_path):
    """A released checkpoint.pt holds only the trained parts, under the wrapped names, maybe with module."""
    ours = _vlmkit(tmp_path)
    ref = _openflamingo(ours)
    full = ref.state_dict()
    trained = {
        f"module.{k}": v.clone() for k, v in full.items()
        if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or k == "lang_encoder.model.embed_tokens.weight"
    }
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": trained}, path)
    loaded = import_openflamingo(ours, path)
    assert loaded and all(k.startswith(("connector.", "fusion.", "decoder.model.model.embed_tokens")) for k in loaded)
    block = ours.fusion.blocks[1].attn_gate
    assert torch.equal(block, full["lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate"])

    from safetensors.torch import save_file

    st = tmp_path / "checkpoint.safetensors"
    save_file({k.removeprefix("module."): v for k, v in trained.items()}, str(st))
    assert import_openflamingo(ours, st) == loaded
    # strict: the connector and fusion must be covered
    partial = {k: v for k, v in trained.items() if "perceiver" not in k}
    with pytest.raises(VlmkitError, match="connector"):
        import_openflamingo(ours, partial)
    assert all(not k.startswith("connector.") for k in import_openflamingo(ours, partial, strict=False))


def test_mapping_errors_name_the_key(tmp_path):
    ours = _vlmkit(tmp_path)
    state = _openflamingo(ours).state_dict()
    assert "vision_encoder.proj" in state and any(p.startswith("^vision_encoder") for p, _ in IGNORED)
    assert "encoder.visual.proj" not in map_openflamingo_state_dict(state, ours)

    with pytest.raises(VlmkitError, match=r"'bogus\.weight' is not known"):
        map_openflamingo_state_dict({**state, "bogus.weight": torch.zeros(1)}, ours)
    bad = dict(state)
    bad["perceiver.latents"] = torch.zeros(3, 32)
    with pytest.raises(VlmkitError, match=r"'perceiver.latents' has shape \(3, 32\).*connector.latents"):
        map_openflamingo_state_dict(bad, ours)
    bad = dict(state)
    bad["lang_encoder.gated_cross_attn_layers.1.attn_gate"] = torch.full((1,), 9.0)
    with pytest.raises(VlmkitError, match="both map to 'fusion.blocks.0.attn_gate'"):
        map_openflamingo_state_dict(bad, ours)
    with pytest.raises(VlmkitError, match=r"'perceiver.frame_embs' maps to 'connector.frame_embeddings'"):
        map_openflamingo_state_dict({**state, "perceiver.frame_embs": torch.zeros(2, 32)}, ours)
    # a checkpoint trained with cross-attention every layer does not fit every_n_layers 2
    extra = {k.replace("layers.1.", "layers.0."): v for k, v in state.items() if ".1.gated_cross_attn_layer." in k}
    with pytest.raises(VlmkitError, match=r"before decoder layer 0.*every_n_layers"):
        map_openflamingo_state_dict({**state, **extra}, ours)


def test_added_token_rows_move_from_openflamingo_order_to_vlmkit_ids(tmp_path):
    """OpenFlamingo appends <|endofchunk|>, <image>, <PAD>; vlmkit adds pad first: rows move by token."""
    ours = _vlmkit(tmp_path)
    tok = ours.decoder.tokenizer
    state = _openflamingo(ours).state_dict()
    pad, eoc, image = tok.pad_token_id, tok.convert_tokens_to_ids(EOC), tok.convert_tokens_to_ids("<image>")
    base = min(pad, eoc, image)
    assert sorted((pad, eoc, image)) == [base, base + 1, base + 2] and len(tok) == base + 3
    key = "lang_encoder.model.embed_tokens.weight"
    table = state[key]
    of_order = torch.cat([table[:base], table[[eoc, image, pad]]])  # the layout of an OpenFlamingo checkpoint
    permuted = {**state, key: of_order}
    if "lang_encoder.lm_head.weight" in state:
        head = state["lang_encoder.lm_head.weight"]
        permuted["lang_encoder.lm_head.weight"] = torch.cat([head[:base], head[[eoc, image, pad]]])
    moved = map_openflamingo_state_dict(permuted, ours, ["<|endofchunk|>", "<image>", "<PAD>"])
    direct = map_openflamingo_state_dict(state, ours)
    assert set(moved) == set(direct)
    for name in direct:
        assert torch.equal(moved[name], direct[name]), name
    # without the token list the permuted rows would be taken as they are: a silent swap
    assert not torch.equal(map_openflamingo_state_dict(permuted, ours)["decoder.model.model.embed_tokens.weight"],
                           direct["decoder.model.model.embed_tokens.weight"])
    with pytest.raises(VlmkitError, match="'<unknown>'.*not an added token"):
        map_openflamingo_state_dict(permuted, ours, ["<|endofchunk|>", "<unknown>", "<PAD>"])
