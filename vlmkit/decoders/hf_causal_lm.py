"""The ``hf_causal_lm`` decoder: any transformers causal LM.

Exactly one source: ``config`` (random initialisation from a config dict, e.g. a tiny Llama),
``pretrained`` (a hub id or a local folder) or ``gguf_file`` (a local GGUF file).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from vlmkit.core.errors import VlmkitError, listing, suggest
from vlmkit.core.interfaces import BuildContext, DecoderConfig, LanguageDecoder
from vlmkit.core.meta import architecture, stand_in_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: a decoder built from ``config`` (random initialisation) has at most this many parameters
MAX_CONFIG_PARAMETERS = 10**12
#: integers of a transformers config (sizes, counts, token ids) lie within 32 bits
CONFIG_INT_LIMIT = 2**31 - 1
#: and its floats (rope_theta, epsilons, dropout) are at most this large in magnitude
CONFIG_FLOAT_LIMIT = 1e12
#: keys every transformers config takes besides its dataclass fields (read and renamed by PreTrainedConfig)
_LEGACY_KEYS = {
    "torch_dtype", "rope_theta", "rope_scaling", "partial_rotary_factor", "attn_implementation",
    "experts_implementation", "output_attentions", "num_labels", "name_or_path", "per_layer_config",
}
#: the sizes that must be at least 1 (as transformers names them; gpt2's n_embd ... are mapped onto them)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings about a config are repeated when the model is built: not at validation."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@functools.lru_cache(maxsize=None)
def _config_keys(config_cls: type) -> tuple[frozenset[str], tuple[str, ...]]:
    """(every key ``config_cls`` takes, the ones that are its own: shown as what is allowed)."""
    from transformers import GenerationConfig

    try:
        from transformers import PreTrainedConfig
    except ImportError:  # transformers 4
        from transformers import PretrainedConfig as PreTrainedConfig

    def names(cls: type) -> set[str]:
        found = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        with contextlib.suppress(TypeError, ValueError):
            found |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        return found

    own = names(config_cls) | set(getattr(config_cls, "attribute_map", {}) or {})
    generation = getattr(GenerationConfig, "_get_default_generation_params", dict)()  # read and dropped by configs
    known = own | names(PreTrainedConfig) | _LEGACY_KEYS | set(generation)
    with contextlib.suppress(Exception), _quiet_transformers():
        known |= set(config_cls().to_dict())
    common = names(PreTrainedConfig)
    return frozenset(known), tuple(sorted(k for k in own - common if not k.startswith("_")))


def _first_line(exc: BaseException) -> str:
    """The message of a transformers error without its wrapper lines ("Class validation error ...:")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    for prefix in ("ValueError: ", "TypeError: "):
        text = text.removeprefix(prefix)
    return text


def _yaml_number_hint(config: dict[str, Any]) -> str:
    """YAML 1.1 reads 1e9 (no dot, no sign in the exponent) as a string: say so when that is the cause."""
    for key, value in config.items():
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
            if not math.isfinite(number):
                continue
            whole = f"{int(number)}" if number == int(number) else f"{number!r}"
            if "e" in value.lower():
                return f" ({key}: YAML reads {value} as a string, not a number; write {whole})"
            return f" ({key}: '{value}' is a string; write the number without quotes: {whole})"
    return ""


def check_transformers_config(config: dict[str, Any]) -> Any:
    """The transformers config that ``config`` (with ``model_type``) describes, or a ``ValueError``
    naming the key: an unknown model type or key (with the close match), a value transformers
    rejects, a size below 1 or a model beyond :data:`MAX_CONFIG_PARAMETERS`."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in causal:
        examples = [t for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "phi3", "smollm3") if t in causal]
        what = f"'{model_type}'" if isinstance(model_type, str) else f"{type(model_type).__name__} {model_type!r}"
        known_type = isinstance(model_type, str) and model_type in CONFIG_MAPPING
        why = "has no causal language model in transformers" if known_type else "is no model type of transformers"
        raise ValueError(
            f"model_type: {what} {why}{suggest(str(model_type), causal) or ';'} allowed: a causal LM type of transformers "
            f"(AutoModelForCausalLM), e.g. {', '.join(examples)} ({len(causal)} in all)"
        )
    config_cls = CONFIG_MAPPING[model_type]
    known, own = _config_keys(config_cls)
    for key, value in config.items():
        if key == "model_type":
            continue
        if not isinstance(key, str) or key not in known:
            raise ValueError(
                f"unknown key '{key}' for a {model_type} model (transformers' {config_cls.__name__})"
                f"{suggest(str(key), own) or suggest(str(key), known) or ';'} allowed: {listing(own)} "
                "(and the keys every transformers config takes, such as dtype or id2label)"
            )
        bad = _out_of_range(value)
        if bad is not None:
            raise ValueError(f"{key}: {bad}")
    kwargs = copy.deepcopy({k: v for k, v in config.items() if k != "model_type"})  # transformers edits nested dicts
    try:
        with _quiet_transformers():
            hf_config = AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad value (strict dataclasses)
        raise ValueError(
            f"transformers rejects this {model_type} config: {_first_line(exc)}{_yaml_number_hint(kwargs)}"
        ) from None
    # gpt2 writes hidden_size as n_embd ...: name the key as the recipe wrote it
    written = {std: own_name for std, own_name in (getattr(config_cls, "attribute_map", {}) or {}).items()
               if own_name in config}
    for name in _SIZES:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"{written.get(name, name)}: got {value}; a size or count is at least 1")
    params = estimate_parameters(hf_config)
    if params is not None and params > MAX_CONFIG_PARAMETERS:
        raise ValueError(
            f"this {model_type} config describes a model of about {params:.2g} parameters, "
            f"{_gib(params * 4)} in float32 ({_size_summary(hf_config)}); a decoder built from 'config' has at most "
            f"10^{round(math.log10(MAX_CONFIG_PARAMETERS))} parameters: is a size off by a few digits?"
        )
    return hf_config


def _out_of_range(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) > CONFIG_INT_LIMIT:
        return f"{value} is out of range; integers of a transformers config lie between -{CONFIG_INT_LIMIT} and {CONFIG_INT_LIMIT}"
    if isinstance(value, float) and (not math.isfinite(value) or abs(value) > CONFIG_FLOAT_LIMIT):
        return f"{value} is out of range; numbers of a transformers config are finite and at most {CONFIG_FLOAT_LIMIT:.0e}"
    if isinstance(value, dict):
        for k, v in value.items():
            bad = _out_of_range(v)
            if bad is not None:
                return f"{k}: {bad}"
    if isinstance(value, (list, tuple)):
        for v in value:
            bad = _out_of_range(v)
            if bad is not None:
                return bad
    return None


def estimate_parameters(hf_config: Any) -> int | None:
    """About how many parameters a decoder-only transformer of ``hf_config`` has (embeddings, output
    head, attention and MLP); None where the config does not name the usual sizes."""
    def size(*names: str) -> int | None:
        for name in names:
            value = getattr(hf_config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    hidden, layers, vocab = size("hidden_size"), size("num_hidden_layers"), size("vocab_size")
    if hidden is None or layers is None or vocab is None:
        return None
    inner = size("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    experts = size("num_local_experts", "num_experts", "n_routed_experts") or 1
    embeddings = vocab * hidden * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    return embeddings + layers * (4 * hidden * hidden + 3 * hidden * inner * experts)


def _size_summary(hf_config: Any) -> str:
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    return ", ".join(f"{n} {getattr(hf_config, n)}" for n in names if getattr(hf_config, n, None) is not None)


def _gib(n_bytes: float) -> str:
    gib = n_bytes / 2**30
    return f"{gib:,.0f} GiB" if gib >= 10 else f"{gib:.2g} GiB"


def _physical_memory() -> int | None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


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

    @field_validator("config")
    @classmethod
    def _transformers_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and "model_type" in value:
            check_transformers_config(value)
        return value

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

    @classmethod
    def build(cls, config: HFCausalLMConfig, context: BuildContext) -> "HFCausalLM":
        """transformers builds and loads a pretrained model in one call (``from_pretrained``): on the
        meta device the architecture is built from its config only, with a stand-in tokenizer."""
        return cls(config, meta=context.meta)

    def __init__(self, config: HFCausalLMConfig, *, meta: bool = False):
        """``meta``: build on the meta device (under ``torch.device("meta")``), reading no weights."""
        super().__init__(config)
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = _DTYPES[config.dtype]
        common: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
        if config.attn_implementation is not None:
            common["attn_implementation"] = config.attn_implementation
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
                cfg_dict = copy.deepcopy(config.config)  # transformers edits nested dicts (rope_scaling)
                model_type = cfg_dict.pop("model_type")
                cfg_dict.setdefault("vocab_size", len(self._tokenizer))
                try:
                    hf_config = AutoConfig.for_model(model_type, **cfg_dict)
                except Exception as exc:  # noqa: BLE001 - a config not validated by the recipe (strict dataclass errors)
                    raise VlmkitError(f"model.decoder.config: transformers rejects this {model_type} config: "
                                      f"{_first_line(exc)}{_yaml_number_hint(cfg_dict)}") from None
                if not meta:
                    self._check_memory(hf_config, dtype)
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
    def _check_memory(hf_config: Any, dtype: torch.dtype) -> None:
        """Refuse a random-init model whose weights alone exceed this machine's memory: building it
        would fail in the allocator, or be killed by the system half way through its initialisation."""
        params = estimate_parameters(hf_config)
        memory = _physical_memory()
        if params is None or memory is None:
            return
        needed = params * torch.empty((), dtype=dtype).element_size()
        if needed > memory:
            error = MemoryError(
                f"model.decoder.config: this model needs about {_gib(needed)} for its weights alone "
                f"({params:,} parameters in {str(dtype).removeprefix('torch.')}: {_size_summary(hf_config)}), but this "
                f"machine has {_gib(memory)} of memory; make the sizes smaller"
            )
            error.explained = True  # build_model reports it as it is, with the recipe file
            raise error

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
            self.model.resize_token_embeddings(
                len(tok), mean_resizing=self.config.new_token_init == "mean" and not self.model.get_input_embeddings().weight.is_meta,
            )
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
        # the model names its transformer block classes itself (transformers' ``_no_split_modules``,
        # what accelerate's device maps keep whole): the layers are the one list of such blocks
        blocks = set(getattr(self.model, "_no_split_modules", None) or ())
        candidates = [
            name for name, mod in self.model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) and all(type(m).__name__ in blocks for m in mod)
        ]
        if len(candidates) != 1:
            found = f"{len(candidates)} lists of them ({', '.join(candidates)})" if candidates else "no list of them"
            raise VlmkitError(
                f"model.decoder: {type(self.model).__name__} names its decoder layer classes as "
                f"{sorted(blocks) or 'nothing'} and holds {found}; name the layers with model.decoder.layers_path "
                "(e.g. model.layers)"
            )
        return self.model.get_submodule(candidates[0])

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
