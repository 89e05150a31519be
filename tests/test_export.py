"""Export and load: the exported folder rebuilds the trained model exactly (full fine-tuning,
merged and separate LoRA), holds only the trained parts, leaves the live model alone, and every
broken folder is a VlmkitError naming the path and what is wrong."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vlmkit
from tiny import resolved_toy
from vlmkit.core.engine.step import answer_loss
from vlmkit.core import export as export_mod
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import Collator
from tiny import ToyCaptions, ToyCaptionsConfig  # rendered with llava_plain, as the toy recipe does
from vlmkit.core.errors import VlmkitError
from vlmkit.core.export import export_model, load
from vlmkit.core.tuning import apply_tuning

INPUTS = ("input_ids", "attention_mask", "vision_x", "media_mask")


# ------------------------------------------------------------------------------------- helpers
def _batches(model):
    data = ToyCaptions(ToyCaptionsConfig(num_samples=6, image_size=32))
    samples = [data[i] for i in range(6)]
    train = Collator(model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens())(samples)
    prompts = [data[i] for i in range(3)]
    for s in prompts:  # prompts end before the caption
        s.segments = [seg for seg in s.segments if not seg[1]]
    gen = Collator(
        model.decoder.tokenizer, model.encoder.preprocess, "<image>", model.placeholder_tokens(), padding_side="left"
    )(prompts)
    return train, gen


def _inputs(batch):
    return {k: batch[k] for k in INPUTS}


def _train(model, resolved, batch, steps=2, lr=1e-2):
    """A few AdamW steps per stage, with each stage's tune modes (LoRA injected as in training)."""
    for i, stage in enumerate(resolved.recipe.stages):
        apply_tuning(model, stage.tune, f"stages.{i}")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for _ in range(steps):
            answer_loss(model(**_inputs(batch)).logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(**_inputs(batch)).logits


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _lora(data):
    data["stages"][1]["tune"]["decoder"] = {"mode": "lora", "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """toy_prefix smoke: connector full in align, connector + decoder full in instruct."""
    tmp = tmp_path_factory.mktemp("full")
    resolved = resolved_toy(tmp)
    model = build_model(resolved)
    train, gen = _batches(model)
    _train(model, resolved, train)
    out = export_model(model, resolved, tmp / "export")
    return resolved, model, train, gen, out


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    resolved = resolved_toy(tmp, _lora)
    model = build_model(resolved)
    train, gen = _batches(model)
    _train(model, resolved, train)
    return resolved, model, train, gen, tmp


# ------------------------------------------------------------------------------ full fine-tuning
def test_full_finetune_round_trip_logits_and_generation(full):
    resolved, model, train, gen, out = full
    loaded = vlmkit.load(out)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    live, back = _logits(model, train), _logits(loaded, train)
    assert torch.allclose(live, back, rtol=0, atol=1e-6), (live - back).abs().max()
    # the frozen encoder is rebuilt from the recipe's seed, not exported: it must match too
    for (n, a), (_, b) in zip(model.encoder.state_dict().items(), loaded.encoder.state_dict().items()):
        assert torch.equal(a, b), n
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**_inputs(gen), **kwargs), loaded.generate(**_inputs(gen), **kwargs))
    # and a model that was not trained gives other logits: the weights really came from the export
    assert not torch.allclose(_logits(build_model(resolved).eval(), train), live, atol=1e-3)


def test_export_folder_layout_and_metadata(full):
    resolved, model, _, _, out = full
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.safetensors", "recipe.yaml", "tokenizer"]
    assert not list(out.parent.glob(".export.tmp-*"))  # the temporary folder was renamed into place
    assert (out / "recipe.yaml").read_text() == resolved.to_yaml()
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "vlmkit-export" and meta["vlmkit_version"] == vlmkit.__version__
    assert meta["merge_lora"] is True
    assert set(meta["files"]) == {"model.safetensors"}
    assert set(meta["files"]["model.safetensors"]["keys"]) == _keys(out / "model.safetensors")
    assert meta["components"]["encoder"] == ["not exported: frozen in every stage (rebuilt from the recipe)"]
    assert meta["components"]["connector"] == ["all weights (full in stages align, instruct)"]
    # the tokenizer is saved with the added <image> token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tok) == len(model.decoder.tokenizer) == meta["tokenizer"]["size"]
    assert tok.convert_tokens_to_ids("<image>") == model.decoder.tokenizer.convert_tokens_to_ids("<image>")


def test_exported_keys_are_the_trained_parts(full):
    _, model, _, _, out = full
    keys = _keys(out / "model.safetensors")
    state = model.state_dict()
    assert not any(k.startswith(("encoder.", "fusion.")) for k in keys)  # frozen in every stage
    assert {k for k in state if k.startswith("connector.")} <= keys
    assert {k for k in state if k.startswith("decoder.")} <= keys  # full in instruct
    assert keys <= set(state)


@pytest.mark.parametrize(
    "tune, expected",
    [
        # the decoder frozen but its embedding tables trained: only those (input and untied output)
        (
            {"decoder": "frozen", "embeddings": "new_tokens"},
            {"decoder.model.model.embed_tokens.weight", "decoder.model.lm_head.weight"},
        ),
        # the last decoder layer only
        ({"decoder": {"mode": "partial", "last_layers": 1}}, "decoder.model.model.layers.1."),
    ],
    ids=["embeddings_new_tokens", "partial_last_layer"],
)
def test_exported_keys_follow_partial_and_embedding_modes(tmp_path, tune, expected):
    def mutate(data):
        data["stages"][1]["tune"].update(tune)

    resolved = resolved_toy(tmp_path, mutate)
    model = build_model(resolved)
    out = export_model(model, resolved, tmp_path / "export")
    keys = _keys(out / "model.safetensors")
    decoder_keys = {k for k in keys if k.startswith("decoder.")}
    if isinstance(expected, set):
        assert decoder_keys == expected
    else:
        assert decoder_keys == {k for k in model.state_dict() if k.startswith(expected)}
        assert decoder_keys
    assert {k for k in keys if not k.startswith("decoder.")} == {k for k in model.state_dict() if k.startswith("connector.")}


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_merged_and_separate_exports_match_and_leave_the_live_model_alone(lora):
    resolved, model, train, gen, tmp = lora
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().max() > 0 for p in lora_b.values())  # the adapters do something
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits_before = _logits(model, train)

    merged_dir = export_model(model, resolved, tmp / "merged", merge_lora=True)
    separate_dir = export_model(model, resolved, tmp / "separate", merge_lora=False)

    # the live model is as it was: same parameters (names and values), adapters unmerged
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(torch.equal(params_before[n], p) for n, p in params_after.items())
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    assert layers and not any(m.merged for m in layers)
    assert torch.equal(_logits(model, train), logits_before)

    # merged: plain module names, no adapters in the loaded model, same outputs
    keys = _keys(merged_dir / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    targets = {n.removesuffix(".lora_B.default.weight") + ".weight" for n in lora_b}
    assert targets <= keys
    merged = load(merged_dir)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    live_base = dict(model.named_parameters())
    some = sorted(targets)[0]
    assert not torch.equal(merged.state_dict()[some], live_base[some.replace(".weight", ".base_layer.weight")])
    assert torch.allclose(_logits(merged, train), logits_before, rtol=0, atol=1e-5)

    # separate: the adapters are re-injected and loaded
    assert {"adapters.safetensors", "adapters.json"} <= {p.name for p in separate_dir.iterdir()}
    assert _keys(separate_dir / "adapters.safetensors") == {n for n, _ in model.named_parameters() if "lora_" in n}
    config = json.loads((separate_dir / "adapters.json").read_text())["components"]
    assert set(config) == {"decoder"}
    assert (config["decoder"]["r"], config["decoder"]["alpha"]) == (4, 8.0)
    assert not any("lora_" in k or "base_layer" in k for k in _keys(separate_dir / "model.safetensors"))
    meta = json.loads((separate_dir / "export.json").read_text())
    assert meta["merge_lora"] is False
    assert meta["components"]["decoder"] == ["LoRA adapters in adapters.safetensors (lora in stage instruct)"]
    separate = load(separate_dir)
    assert {n for n, _ in separate.named_parameters()} == set(params_before)
    assert torch.allclose(_logits(separate, train), logits_before, rtol=0, atol=1e-6)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(separate.generate(**_inputs(gen), **kwargs), model.generate(**_inputs(gen), **kwargs))


def test_lora_recipe_without_adapters_in_the_model_is_refused(tmp_path):
    resolved = resolved_toy(tmp_path, _lora)
    with pytest.raises(VlmkitError, match="tunes 'decoder' with LoRA in stage instruct but the model has no LoRA"):
        export_model(build_model(resolved), resolved, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------- errors
@pytest.fixture
def copy_of(full, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(full[4], target)
    return target


def test_missing_folder_and_missing_files(tmp_path, copy_of):
    with pytest.raises(VlmkitError, match=r"'.*nowhere': no such export folder"):
        load(tmp_path / "nowhere")
    (copy_of / "recipe.yaml").unlink()
    with pytest.raises(VlmkitError, match=re.escape(f"'{copy_of}' is not a complete vlmkit export: recipe.yaml is missing")):
        load(copy_of)


def test_missing_weights_and_malformed_metadata(full, tmp_path):
    src = full[4]
    no_weights = shutil.copytree(src, tmp_path / "a")
    (no_weights / "model.safetensors").unlink()
    expected = f"'{no_weights}' is not a complete vlmkit export: model.safetensors is missing"
    with pytest.raises(VlmkitError, match=re.escape(expected)):
        load(no_weights)
    bad_json = shutil.copytree(src, tmp_path / "b")
    (bad_json / "export.json").write_text("{not json")
    with pytest.raises(VlmkitError, match=r"export.json': cannot read it as JSON"):
        load(bad_json)
    not_weights = shutil.copytree(src, tmp_path / "c")
    (not_weights / "model.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(VlmkitError, match=r"model.safetensors': cannot read it as safetensors"):
        load(not_weights)
    with pytest.raises(VlmkitError, match="is not a folder"):
        load(src / "recipe.yaml")
    bad_recipe = shutil.copytree(src, tmp_path / "d")
    (bad_recipe / "recipe.yaml").write_text("name: broken\n")
    with pytest.raises(VlmkitError, match=r"(?s)d/recipe\.yaml: .*model: required field is missing"):
        load(bad_recipe)


def test_unknown_key_is_named(copy_of):
    path = copy_of / "model.safetensors"
    weights = load_file(str(path))
    weights["connector.net.9.weight"] = torch.zeros(2, 2)
    save_file(weights, str(path))
    with pytest.raises(VlmkitError, match=r"weight 'connector\.net\.9\.weight' does not exist in the model rebuilt") as info:
        load(copy_of)
    assert str(path) in str(info.value)


def test_shape_mismatch_is_named(copy_of):
    path = copy_of / "model.safetensors"
    weights = load_file(str(path))
    weights["connector.net.0.weight"] = torch.zeros(3, 5)
    save_file(weights, str(path))
    with pytest.raises(VlmkitError, match=r"weight 'connector\.net\.0\.weight' has shape \[3, 5\] but") as info:
        load(copy_of)
    assert str(path) in str(info.value)


def test_weight_listed_but_missing_from_the_file_is_named(copy_of):
    path = copy_of / "model.safetensors"
    weights = load_file(str(path))
    del weights["connector.net.2.bias"]
    save_file(weights, str(path))
    with pytest.raises(VlmkitError, match=r"weight 'connector\.net\.2\.bias' is missing"):
        load(copy_of)


def test_a_failed_export_leaves_no_folder(full, tmp_path, monkeypatch):
    resolved, model, _, _, _ = full

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", broken)
    with pytest.raises(VlmkitError, match=r"cannot write the export .*export: disk full; free space there"):
        export_model(model, resolved, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_load_is_a_lazy_top_level_export():
    assert vlmkit.load is load
    assert "load" in vlmkit.__all__


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # training's injection: peft fixes it up
def test_gpt2_tied_embeddings_and_conv1d_lora(tmp_path):
    """GPT-2: the output head shares the input table (written once), LoRA wraps Conv1D layers
    (fan_in_fan_out), embeddings train in full next to the adapters."""

    def mutate(data):
        data["model"]["decoder"]["config"] = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}
        _lora(data)
        data["stages"][1]["tune"]["embeddings"] = "all"

    resolved = resolved_toy(tmp_path, mutate)
    model = build_model(resolved)
    train, _ = _batches(model)
    _train(model, resolved, train, steps=1)
    live = _logits(model, train)
    attn = {f"decoder.model.transformer.h.{i}.attn.c_attn.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for merge, decoder_keys, atol in [(True, attn | {"decoder.model.transformer.wte.weight"}, 1e-5),
                                      (False, {"decoder.model.transformer.wte.weight"}, 1e-6)]:
        out = export_model(model, resolved, tmp_path / f"merge-{merge}", merge_lora=merge)
        assert {k for k in _keys(out / "model.safetensors") if k.startswith("decoder.")} == decoder_keys
        loaded = load(out)
        assert loaded.decoder.model.lm_head.weight is loaded.decoder.model.transformer.wte.weight  # still tied
        assert torch.allclose(_logits(loaded, train), live, rtol=0, atol=atol)
    assert json.loads((out / "adapters.json").read_text())["components"]["decoder"]["fan_in_fan_out"] is True


def test_the_engines_export_loads_back_as_the_trained_model(tmp_path):
    """A real (2 + 2 step) run of the engine, which exports at its end with run.merge_lora."""
    from vlmkit.core.engine import run

    def mutate(data):
        _lora(data)
        data["run"] = {"merge_lora": True}
        for stage in data["profiles"]["smoke"]["stages"]:
            stage["max_steps"] = 2

    result = run(resolved_toy(tmp_path, mutate), tmp_path / "run", progress=False)
    assert result.export is not None and (result.export / "export.json").is_file()
    model = result.model.eval()
    train, _ = _batches(model)
    loaded = vlmkit.load(result.export, device="cpu")
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(_logits(loaded, train), _logits(model, train), rtol=0, atol=1e-5)
