"""The vertical slice's components: shapes, wiring, the prefix fusion's placement of image tokens,
label masks, tuning modes and safe weight loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from tiny import resolved_toy
from vlmkit.core.engine.step import answer_loss
from vlmkit.connectors.mlp import LinearProjector, MLPConfig, MLPProjector
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import IGNORE, Collator
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import BuildContext, Sample
from vlmkit.core.recipe.schema import StageTune
from vlmkit.core.tuning import apply_tuning
from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer
from vlmkit.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig
from vlmkit.encoders.timm import TimmEncoder, TimmEncoderConfig

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


# ------------------------------------------------------------------------------------- encoders
def test_timm_vit_tokens_drop_cls():
    enc = TimmEncoder(TimmEncoderConfig(model_name="vit_tiny_patch16_224", image_size=32, model_kwargs=VIT))
    out = enc(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16, 32)  # (32/8)^2 patches, CLS dropped
    assert enc.width == 32 and enc.num_tokens() == 16
    keep = TimmEncoder(TimmEncoderConfig(model_name="vit_tiny_patch16_224", image_size=32, model_kwargs=VIT, drop_prefix_tokens=False))
    assert keep(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_timm_cnn_last_map_and_chosen_stage():
    enc = TimmEncoder(TimmEncoderConfig(model_name="efficientnet_lite0", image_size=64))
    assert enc.width == 1280  # forward_features ends with the 1x1 conv head
    out = enc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4, enc.width)  # 64 / 32 = 2 -> 2x2 map
    staged = TimmEncoder(TimmEncoderConfig(model_name="efficientnet_lite0", image_size=64, feature_stage=-1))
    assert staged.width == 320  # the last stage has 320 channels (REFERENCE section 4)
    assert staged(torch.randn(1, 3, 64, 64)).shape == (1, 4, 320)
    assert staged.num_tokens(224) == 49  # 7x7 at 224 px
    pre = staged.preprocess
    assert pre.image_size == 64 and len(pre.mean) == 3


def test_timm_weights_from_safetensors_and_pth(tmp_path):
    cfg = dict(model_name="vit_tiny_patch16_224", image_size=32, model_kwargs=VIT)
    torch.manual_seed(1)
    source = TimmEncoder(TimmEncoderConfig(**cfg))
    state = source.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    x = torch.randn(1, 3, 32, 32)
    for name in ("w.safetensors", "w.pth"):
        torch.manual_seed(2)
        loaded = TimmEncoder.build(TimmEncoderConfig(**cfg, weights=str(tmp_path / name)), BuildContext())
        torch.testing.assert_close(loaded(x), source(x))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(VlmkitError, match="weights-only"):
        TimmEncoder.build(TimmEncoderConfig(model_name="vit_tiny_patch16_224", image_size=32, model_kwargs=VIT, weights=str(path)), BuildContext())


# ------------------------------------------------------------------------------------ connectors
def test_mlp_depths_and_linear():
    mlp3 = MLPProjector(MLPConfig(projector="mlp3x_gelu", width_in=8, width_out=16))
    linears = [m for m in mlp3.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(8, 16), (16, 16), (16, 16)]
    assert mlp3(torch.randn(2, 5, 8)).shape == (2, 5, 16)
    assert mlp3.num_queries(5, num_frames=3) == 15
    lin = LinearProjector(LinearProjector.Config(width_in=8, width_out=4))
    x = torch.randn(1, 2, 8)
    torch.testing.assert_close(lin(x), x @ lin.proj.weight.T + lin.proj.bias)


def test_projectors_mean_pool_each_frame_to_one_token():
    mlp = MLPProjector(MLPConfig(projector="mlp2x_gelu", width_in=8, width_out=16, pool="mean"))
    x = torch.randn(2, 3 * 5, 8)  # 3 frames of 5 tokens
    out = mlp(x, num_frames=3)
    assert out.shape == (2, 3, 16) and mlp.num_queries(5, num_frames=3) == 3
    frames = x.reshape(2, 3, 5, 8).mean(dim=2)
    torch.testing.assert_close(out, mlp.net(frames))
    assert not torch.allclose(out[:, 0], out[:, 1])  # frames stay apart
    lin = LinearProjector(LinearProjector.Config(width_in=8, width_out=4, pool="mean"))
    torch.testing.assert_close(lin(x[:, :5]), x[:, :5].mean(dim=1, keepdim=True) @ lin.proj.weight.T + lin.proj.bias)
    with pytest.raises(ValueError, match="do not split into 2 frames"):
        lin(x[:, :5], num_frames=2)
    with pytest.raises(ValueError, match="pool"):
        MLPConfig(width_in=8, width_out=16, pool="max")


# -------------------------------------------------------------------------------------- decoders
def test_byte_tokenizer_round_trip():
    tok = byte_level_tokenizer()
    text = "a red circle, héllo"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


@pytest.mark.parametrize(
    "config, layers",
    [
        ({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 2, "num_key_value_heads": 1}, "model.layers"),
        ({"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 2}, "transformer.h"),
        ({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 2, "num_key_value_heads": 1}, "model.layers"),
    ],
)
def test_decoder_families_layers_and_special_tokens(config, layers):
    dec = HFCausalLM(HFCausalLMConfig(config=config, tokenizer_type="byte_level"))
    found = dec.decoder_layers()
    expected = dec.model.get_submodule(layers)
    assert found is expected and len(found) == 3
    assert dec.width == 32
    n = dec.get_input_embeddings().num_embeddings
    ids = dec.add_special_tokens(["<image>", "<|endofchunk|>"])
    assert dec.get_input_embeddings().num_embeddings == n + 2
    assert sorted(ids.values()) == [n, n + 1]
    assert dec.add_special_tokens(["<image>"]) == {"<image>": ids["<image>"]}  # idempotent
    assert dec.lora_target_modules()
    out = dec(inputs_embeds=torch.randn(1, 4, 32), attention_mask=torch.ones(1, 4, dtype=torch.long),
              labels=torch.tensor([[1, 2, 3, 4]]))
    assert out.logits.shape == (1, 4, n + 2) and torch.isfinite(out.loss)


def test_layers_path_errors_name_the_field():
    dec = HFCausalLM(HFCausalLMConfig(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2},
                                      tokenizer_type="byte_level", layers_path="transformer.nope"))
    with pytest.raises(VlmkitError, match="model.decoder.layers_path"):
        dec.decoder_layers()


# ---------------------------------------------------------------------------- composition, fusion
def test_width_mismatch_names_both_components(tmp_path):
    def mutate(data):
        data["model"]["connector"]["width_in"] = 48

    with pytest.raises(VlmkitError) as err:
        build_model(resolved_toy(tmp_path, mutate))
    text = str(err.value)
    assert "model.connector.width_in" in text and "48" in text and "'timm'" in text and "32" in text and "'mlp'" in text

    def mutate_out(data):
        data["model"]["connector"]["width_out"] = 48

    with pytest.raises(VlmkitError) as err:
        build_model(resolved_toy(tmp_path, mutate_out))
    text = str(err.value)
    assert "model.connector.width_out" in text and "48" in text and "64" in text and "'hf_causal_lm'" in text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model(resolved_toy(tmp_path_factory.mktemp("m"))).eval()


def _collator(model, side="right"):
    return Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens(), padding_side=side)


def _samples():
    data = ToyCaptions(ToyCaptionsConfig(num_samples=4, image_size=32))
    a, b = data[0], data[1]
    two = Sample("two", images=[a.images[0], b.images[0]],
                 segments=[("<image>first ", False), ("<image>second", False), (" both shapes", True)])
    return [two, data[2]]


def test_collator_labels_cover_exactly_the_answer(model):
    col = _collator(model)
    batch = col([_samples()[1]])
    tok = model.decoder.tokenizer
    labels = batch["labels"][0]
    trained = labels[labels != IGNORE].tolist()
    caption = _samples()[1].segments[1][0]
    assert caption.endswith("\n") and caption.startswith("a ")  # llava_plain: caption + separator, no EOS
    assert trained == tok(caption, add_special_tokens=False)["input_ids"]
    q = model.placeholder_tokens()
    assert q == 16 and int((batch["input_ids"] == col.image_token_id).sum()) == q
    assert batch["vision_x"].shape == (1, 1, 1, 3, 32, 32)


def test_collator_counts_markers_against_images(model):
    bad = Sample("bad", images=[], segments=[("<image>", False), ("x", True)])
    with pytest.raises(VlmkitError, match="sample 'bad'"):
        _collator(model)([bad])


def test_prefix_places_images_and_padding_side_does_not_matter(model):
    samples = _samples()
    right = _collator(model, "right")(samples)
    left = _collator(model, "left")(samples)
    assert right["media_mask"].tolist() == [[True, True], [True, False]]
    with torch.no_grad():
        out_r = model(**{k: v for k, v in right.items() if k not in ("ids", "labels")})
        out_l = model(**{k: v for k, v in left.items() if k not in ("ids", "labels")})
    # sample 1 is shorter: compare its real positions under both paddings
    n = int(right["attention_mask"][1].sum())
    torch.testing.assert_close(out_r.logits[1, :n], out_l.logits[1, -n:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_r.logits[0], out_l.logits[0], atol=1e-4, rtol=1e-4)


def test_prefix_image_tokens_reach_their_positions(model):
    samples = _samples()
    batch = _collator(model)(samples)
    tensors = {k: v for k, v in batch.items() if k not in ("ids", "labels")}
    media = model.encode_media(tensors["vision_x"], tensors["media_mask"])
    ids = tensors["input_ids"]
    captured = {}
    emb = model.decoder.get_input_embeddings()

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = model.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**tensors)
    finally:
        handle.remove()
    embeds = captured["embeds"]
    q = model.placeholder_tokens()
    pos = (ids[0] == model.fusion.image_token_id).nonzero().flatten()
    torch.testing.assert_close(embeds[0, pos[:q]], media[0, 0])
    torch.testing.assert_close(embeds[0, pos[q:]], media[0, 1])
    text_pos = (ids[1] != model.fusion.image_token_id).nonzero().flatten()
    torch.testing.assert_close(embeds[1, text_pos], emb(ids[1, text_pos]))
    # changing the second image changes logits only after its first placeholder
    other = tensors | {"vision_x": tensors["vision_x"].clone()}
    other["vision_x"][0, 1] = torch.randn_like(other["vision_x"][0, 1])
    with torch.no_grad():
        base, changed = model(**tensors).logits, model(**other).logits
    first = int(pos[q])
    torch.testing.assert_close(base[0, :first], changed[0, :first])
    assert not torch.allclose(base[0, first:], changed[0, first:])


def test_prefix_rejects_marker_image_mismatch(model):
    batch = _collator(model)(_samples())
    tensors = {k: v for k, v in batch.items() if k not in ("ids", "labels")}
    tensors["media_mask"] = torch.tensor([[True, False], [True, False]])
    with pytest.raises(VlmkitError, match="<image> token positions"):
        model(**tensors)


# ------------------------------------------------------------------------------------------ tuning
def _tune(**modes):
    base = {"encoder": "frozen", "connector": "frozen", "fusion": "frozen", "decoder": "frozen"}
    return StageTune.model_validate(base | modes)


def test_tuning_modes(tmp_path):
    model = build_model(resolved_toy(tmp_path))
    report = apply_tuning(model, _tune(connector="full"), "stages.0").report
    assert report["connector"]["frozen"] == 0 and report["decoder"]["trainable"] == 0
    report = apply_tuning(model, _tune(decoder={"mode": "partial", "last_layers": 1}), "stages.0").report
    layers = model.decoder.decoder_layers()
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert report["decoder"]["trainable"] == sum(p.numel() for p in layers[-1].parameters())
    report = apply_tuning(model, _tune(decoder={"mode": "lora", "lora": {"r": 4}}), "stages.1").report
    trainable = [n for n, p in model.decoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.endswith("q_proj.lora_A.default.weight") for n in trainable)
    count = len(trainable)
    apply_tuning(model, _tune(decoder={"mode": "lora"}), "stages.2")  # adapters are reused, not stacked
    assert len([n for n, p in model.decoder.named_parameters() if p.requires_grad]) == count
    with pytest.raises(VlmkitError, match=r"stages.3.tune.connector.modules: no sub-module 'nope'"):
        apply_tuning(model, _tune(connector={"mode": "partial", "modules": ["nope"]}), "stages.3")


def test_decoder_from_local_folder_equals_saved_model(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1}
    torch.manual_seed(0)
    source = HFCausalLM(HFCausalLMConfig(config=cfg, tokenizer_type="byte_level"))
    source.model.save_pretrained(tmp_path / "lm")
    source.tokenizer.save_pretrained(tmp_path / "lm")
    loaded = HFCausalLM(HFCausalLMConfig(pretrained=str(tmp_path / "lm")))
    ids = torch.tensor([[5, 6, 7, 8]])
    emb = loaded.get_input_embeddings()(ids)
    torch.testing.assert_close(loaded(inputs_embeds=emb).logits, source(inputs_embeds=source.get_input_embeddings()(ids)).logits)
    assert loaded.tokenizer("abc", add_special_tokens=False)["input_ids"] == source.tokenizer("abc", add_special_tokens=False)["input_ids"]


def test_decoder_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(VlmkitError, match="model.decoder"):
        HFCausalLM(HFCausalLMConfig(pretrained=str(tmp_path / "nope")))


def test_prefix_generation_cached_equals_uncached(model):
    samples = _samples()
    for s in samples:  # prompts end before the answer
        s.segments = [seg for seg in s.segments if not seg[1]]
    batch = _collator(model, "left")(samples)
    tensors = {k: v for k, v in batch.items() if k not in ("ids", "labels")}
    cached = model.generate(**tensors, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(**tensors, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, uncached)
    # the first generated token is the argmax of the full forward pass at the last position
    with torch.no_grad():
        logits = model(**tensors).logits
    assert torch.equal(cached[:, 0], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("family", ["llama_untied", "gpt2_tied"])
def test_embedding_rows_new_tokens_vs_all(tmp_path, family):
    from vlmkit.core.engine.optim import param_groups
    from vlmkit.core.tuning import embedding_tables

    def mutate(data):
        if family == "gpt2_tied":
            data["model"]["decoder"]["config"] = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}
        data["model"]["decoder"]["special_tokens"] = ["<|endofchunk|>"]

    resolved = resolved_toy(tmp_path, mutate)
    for mode in ("new_tokens", "all"):
        model = build_model(resolved)
        dec = model.decoder
        assert len(dec.new_token_ids) == 2  # <|endofchunk|> from the recipe, <image> from the fusion
        tables = embedding_tables(dec)
        assert len(tables) == (1 if family == "gpt2_tied" else 2)
        tune = _tune(connector="full").model_copy(update={"embeddings": mode})
        report = apply_tuning(model, tune, "stages.0").report
        width = tables[0].shape[1]
        expected = 2 * width * len(tables) if mode == "new_tokens" else sum(t.numel() for t in tables)
        assert report["embeddings"]["trainable"] == expected
        before = [t.detach().clone() for t in tables]
        stage = resolved.recipe.stages[0]
        groups = param_groups(model, stage.model_copy(update={"optimizer": stage.optimizer.model_copy(update={"weight_decay": 0.1})}))
        assert all(g["weight_decay"] == 0.0 for g in groups if any(p is tables[0] for p in g["params"]))
        opt = torch.optim.AdamW(groups, lr=1e-2)
        samples = _samples()
        samples[1].segments = [("<image>", False), ("shape<|endofchunk|> done", True)]  # a token follows it
        batch = _collator(model)(samples)
        eoc = dec.tokenizer.convert_tokens_to_ids("<|endofchunk|>")
        assert int((batch["input_ids"] == eoc).sum()) == 1
        for _ in range(2):
            answer_loss(model(**{k: v for k, v in batch.items() if k not in ("ids", "labels")}).logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad()
        new = torch.tensor(dec.new_token_ids)
        old = torch.ones(tables[0].shape[0], dtype=torch.bool)
        old[new] = False
        # the input row of <|endofchunk|> trains (the <image> row is replaced by image features in
        # the input); an untied head's rows of every added token train
        assert not torch.equal(tables[0][eoc], before[0][eoc]), "the added token's input row trains"
        for t, b in zip(tables[1:], before[1:]):
            assert not torch.equal(t[new], b[new]), "the added tokens' output rows train"
        for t, b in zip(tables, before):
            if mode == "new_tokens":
                torch.testing.assert_close(t[old], b[old], rtol=0, atol=0)
            else:
                assert not torch.equal(t[old], b[old])
