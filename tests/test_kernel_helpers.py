"""Kernel helpers with one implementation each: atomic writes, the same-recipe check of a resumed
run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmkit.core.checkpoint import atomic_file, write_text_atomic
from vlmkit.core.engine.trainer import same_recipe
from vlmkit.core.recipe.loader import load_recipe


# ------------------------------------------------------------------------------ atomic writes
def test_atomic_file_replaces_the_target_only_when_the_write_completes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.jsonl"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_file(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".metrics.jsonl.") and tmp.name.endswith(".tmp")
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.jsonl"]  # no temporary left
    write_text_atomic(target, "new\r\nline\n")
    assert target.read_bytes() == b"new\r\nline\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.jsonl"]


def test_a_hidden_target_keeps_one_leading_dot(tmp_path: Path) -> None:
    seen = []
    with atomic_file(tmp_path / ".vlmkit-run") as tmp:
        seen.append(tmp.name)
        tmp.write_text("{}")
    assert seen[0].startswith(".vlmkit-run.") and not seen[0].startswith("..")
    assert (tmp_path / ".vlmkit-run").read_text() == "{}"


# ------------------------------------------------------------------------------ same recipe
def test_same_recipe_compares_the_parsed_recipe_not_its_text() -> None:
    resolved = load_recipe("toy_prefix", "smoke")
    stored = resolved.to_yaml()
    assert same_recipe(stored, resolved)
    # another header comment, another key order and flow style: the same recipe
    data = yaml.safe_load(stored)
    reordered = dict(reversed(list(data.items())))
    assert same_recipe("# resolved elsewhere\n" + yaml.safe_dump(reordered, default_flow_style=True), resolved)
    # a changed value is another recipe
    data["stages"][0]["lr"] = data["stages"][0]["lr"] * 2
    assert not same_recipe(yaml.safe_dump(data), resolved)
    # a stored file that is no recipe mapping is another recipe, not a crash
    assert not same_recipe("- just\n- a list\n", resolved)
    assert not same_recipe("name: [unclosed\n", resolved)


# ------------------------------------------------------------------------------ decoder layers
TINY_FAMILIES = {
    "llama": ({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
               "num_attention_heads": 2}, "model.layers"),
    "gpt2": ({"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 2}, "transformer.h"),
    "qwen2": ({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
               "num_attention_heads": 2}, "model.layers"),
}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_decoder_layers_are_the_list_of_the_blocks_the_model_names(family: str) -> None:
    """transformers' ``_no_split_modules`` names each family's block class; the layer list is found
    through it, not by its length. Fails loudly if transformers stops naming them."""
    from vlmkit.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig

    config, path = TINY_FAMILIES[family]
    dec = HFCausalLM(HFCausalLMConfig(config=config, tokenizer_type="byte_level"))
    assert dec.model._no_split_modules  # what the search relies on
    layers = dec.decoder_layers()
    assert layers is dec.model.get_submodule(path) and len(layers) == 3


def test_a_model_without_named_blocks_asks_for_layers_path() -> None:
    from vlmkit.core.errors import VlmkitError
    from vlmkit.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig

    config, _ = TINY_FAMILIES["llama"]
    dec = HFCausalLM(HFCausalLMConfig(config=config, tokenizer_type="byte_level"))
    dec.model._no_split_modules = []
    with pytest.raises(VlmkitError, match="model.decoder.layers_path"):
        dec.decoder_layers()
    dec = HFCausalLM(HFCausalLMConfig(config=config, tokenizer_type="byte_level", layers_path="model.layers"))
    dec.model._no_split_modules = []
    assert len(dec.decoder_layers()) == 3
