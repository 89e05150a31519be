"""The ``hf_causal_lm`` decoder: any transformers causal LM.

Exactly one source: ``config`` (random initialisation from a config dict, e.g. a tiny Llama),
``pretrained`` (a hub id or a local folder) or ``gguf_file`` (a local GGUF file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator
from torch import nn

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import DecoderConfig, LanguageDecoder
from vlmkit.core.meta import architecture, on_meta, stand_in_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFCausalLMConfig(DecoderConfig):
    config: dict[str, Any] | None = None
    """Random initialisation: ``{model_type: llama, hidden_size: 64, ...}`` (``AutoConfig.for_model``);
    ``vocab_size`` defaults to the tokenizer's size."""
    pretrained: str | None = None
    """A hub id or a local folder with a transformers checkpoint."""
    gguf_file: str | None = None
    """A local ``.gguf`` file (transformers de-quantises it)."""
    tokenizer: str | None = None
    """Hub id or folder of the tokenizer; default: the model's own (required with ``config`` unless
    ``tokenizer_type`` is ``byte_level``)."""
    tokenizer_type: Literal["pretrained", "byte_level"] = "pretrained"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the weights are loaded and kept in while frozen. What a stage trains (layers, LoRA
    adapters, embedding tables) becomes fp32 master weights when the stage starts, so set that
    stage's ``precision`` to the same half precision: it computes under autocast."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    trust_remote_code: bool = False
    special_tokens: list[str] = []
    """Extra special tokens to add (fusions and templates add the ones they need themselves)."""
    new_token_init: Literal["mean", "random"] = "mean"
    """Embedding rows of added tokens: drawn around the mean of the existing rows (``mean``, a neutral
    start that keeps the first losses near the model's own), or from the model's initialiser
    (``random``, as OpenFlamingo and Otter do)."""
    layers_path: str | None = None
    """Dotted path of the decoder-layer list (e.g. ``model.layers``) where it is not found automatically."""

    @model_validator(mode="after")
    def _one_source(self) -> "HFCausalLMConfig":
        given = [k for k in ("config", "pretrained", "gguf_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one source: 'config' (random init), 'pretrained' (hub id or folder) or 'gguf_file'"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.tokenizer_type == "byte_level" and self.tokenizer is not None:
            raise ValueError("'tokenizer' names a pretrained tokenizer; it cannot be combined with tokenizer_type byte_level")
        if self.config is not None and self.tokenizer is None and self.tokenizer_type == "pretrained":
            raise ValueError("a decoder built from 'config' needs 'tokenizer' (hub id or folder) or tokenizer_type: byte_level")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("'config' needs 'model_type' (e.g. llama, gpt2, qwen2)")
        return self


class HFCausalLM(LanguageDecoder):
    """A transformers causal LM from a config dict, a local folder, a hub id or a GGUF file."""

    Config = HFCausalLMConfig

    def __init__(self, config: HFCausalLMConfig):
        super().__init__(config)
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = _DTYPES[config.dtype]
        common: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
        if config.attn_implementation is not None:
            common["attn_implementation"] = config.attn_implementation
        meta = on_meta()
        if meta and config.pretrained is not None and config.tokenizer is None and config.tokenizer_type == "pretrained":
            self._tokenizer = stand_in_tokenizer(config.pretrained, "model.decoder.pretrained")
        else:
            self._tokenizer = self._load_tokenizer(config)
        try:
            if meta and config.gguf_file is not None:  # the config from the file's metadata, no tensors
                path = Path(config.gguf_file).expanduser()
                if not path.is_file():
                    raise VlmkitError(f"model.decoder.gguf_file: '{path}' does not exist")
                hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
                self.model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **common)
            elif meta and config.pretrained is not None:
                cfg_dict = architecture(config.pretrained, "model.decoder.pretrained")
                model_type = cfg_dict.pop("model_type")
                hf_config = AutoConfig.for_model(model_type, **cfg_dict)
                self.model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **common)
            elif config.config is not None:
                cfg_dict = dict(config.config)
                model_type = cfg_dict.pop("model_type")
                cfg_dict.setdefault("vocab_size", len(self._tokenizer))
                hf_config = AutoConfig.for_model(model_type, **cfg_dict)
                self.model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **common)
            elif config.gguf_file is not None:
                path = Path(config.gguf_file).expanduser()
                if not path.is_file():
                    raise VlmkitError(f"model.decoder.gguf_file: '{path}' does not exist")
                self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **common)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(config.pretrained, dtype=dtype, **common)
        except VlmkitError:
            raise
        except (OSError, ValueError) as exc:
            source = config.pretrained or config.gguf_file or "config"
            raise VlmkitError(f"model.decoder: cannot load '{source}': {exc}") from None
        if self._tokenizer.pad_token is None:
            self.add_special_tokens([])  # adds a pad token
        if config.special_tokens:
            self.add_special_tokens(list(config.special_tokens))

    @staticmethod
    def _load_tokenizer(config: HFCausalLMConfig) -> Any:
        if config.tokenizer_type == "byte_level":
            from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer

            return byte_level_tokenizer()
        from transformers import AutoTokenizer

        try:
            if config.tokenizer is not None:
                return AutoTokenizer.from_pretrained(config.tokenizer, trust_remote_code=config.trust_remote_code)
            if config.gguf_file is not None:
                path = Path(config.gguf_file).expanduser()
                return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            return AutoTokenizer.from_pretrained(config.pretrained, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise VlmkitError(f"model.decoder.tokenizer: cannot load the tokenizer: {exc}") from None

    # ---------------------------------------------------------------- interface
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def width(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def add_special_tokens(self, tokens: list[str]) -> dict[str, int]:
        tok = self._tokenizer
        before = set(tok.get_vocab())
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": "<pad>"})
        new = [t for t in dict.fromkeys(tokens) if t not in tok.get_vocab()]
        if new:
            tok.add_tokens(new, special_tokens=True)
        added = [t for t in tok.get_vocab() if t not in before]
        self.new_token_ids.extend(sorted(int(tok.convert_tokens_to_ids(t)) for t in added))
        if len(tok) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(tok), mean_resizing=self.config.new_token_init == "mean" and not on_meta())
        return {t: int(tok.convert_tokens_to_ids(t)) for t in tokens}

    def get_output_embeddings(self) -> nn.Module | None:
        out = self.model.get_output_embeddings()
        if out is None or out.weight is self.model.get_input_embeddings().weight:
            return None
        return out

    def decoder_layers(self) -> nn.ModuleList:
        if self.config.layers_path:
            node: Any = self.model
            for part in self.config.layers_path.split("."):
                node = getattr(node, part, None)
                if node is None:
                    raise VlmkitError(f"model.decoder.layers_path: '{self.config.layers_path}' does not exist in {type(self.model).__name__}")
            if not isinstance(node, nn.ModuleList):
                raise VlmkitError(f"model.decoder.layers_path: '{self.config.layers_path}' is a {type(node).__name__}, not a ModuleList")
            return node
        n_layers = getattr(self.model.config, "num_hidden_layers", None) or getattr(self.model.config, "n_layer", None)
        candidates = [
            (name, mod)
            for name, mod in self.model.named_modules()
            if isinstance(mod, nn.ModuleList) and n_layers is not None and len(mod) == n_layers
        ]
        if not candidates:
            raise VlmkitError(
                f"model.decoder: no list of {n_layers} decoder layers found in {type(self.model).__name__}; "
                "name it with model.decoder.layers_path (e.g. model.layers)"
            )
        return min(candidates, key=lambda c: c[0].count("."))[1]

    def lora_target_modules(self) -> list[str]:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

        model_type = self.model.config.model_type
        if model_type not in mapping:
            raise VlmkitError(
                f"no default LoRA target modules for decoder family '{model_type}'; set the stage's "
                "tune.decoder.lora.target_modules"
            )
        return list(mapping[model_type])

    @property
    def supports_logits_to_keep(self) -> bool:
        """transformers models whose ``forward`` takes ``logits_to_keep`` (most causal LMs of
        transformers >= 4.50 / 5; a (B, L) bool mask keeps the True positions)."""
        import inspect

        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        if hasattr(self.model, "activation_checkpointing_enable"):  # the newer transformers 5 name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False

    def generation_module(self) -> nn.Module:
        return self.model

    def generate(self, **generate_kwargs: Any) -> torch.Tensor:
        generate_kwargs.setdefault("pad_token_id", self._tokenizer.pad_token_id)
        return self.model.generate(**generate_kwargs)
