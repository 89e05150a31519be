"""The recipe schema: pydantic models of every recipe section (unknown keys are errors).

Component sections (``model.encoder`` ...) and dataset entries carry their own options next to
``name`` / ``type``; those are validated in a second pass against the registered component's
``Config`` (:mod:`vlmkit.core.recipe.loader`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from vlmkit.core.errors import suggest

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.\-]*$"
COMPONENTS = ("encoder", "connector", "fusion", "decoder")
MIX_MODES = ("size", "weights", "even")

# Upper bounds: far beyond any real run, they turn a slip (1e30, an extra digit block) into an error
# that names the field and the bound instead of an overflow or an allocation failure later.
MAX_STEPS = 10**9  # optimizer steps, warmup steps, log / checkpoint intervals
MAX_BATCH = 10**6  # samples per micro-batch, micro-batches per step, samples of a dataset per step
MAX_EPOCHS = 10**6
MAX_LR = 1.0  # AdamW moves each weight by about lr per step: above 1 nothing is learned
MAX_TOKENS = 10**7  # tokens per sample
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.manual_seed takes

LearningRate = Annotated[float, Field(gt=0.0, le=MAX_LR)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ComponentSpec(BaseModel):
    """``{name: <registered name>, <the component's own options>}``."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="registered component name (see `recipes components`)")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelSpec(Strict):
    encoder: ComponentSpec
    connector: ComponentSpec
    fusion: ComponentSpec
    decoder: ComponentSpec


class DatasetSpec(BaseModel):
    """``{type: <registered dataset type>, template: <chat template>, weight: w, <its options>}``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="registered dataset type (see `recipes components dataset`)")
    template: str | ComponentSpec | None = Field(
        None, description="chat template that renders its records (a name or {name: ..., options}); "
        "required for datasets of conversations"
    )
    weight: PositiveFloat | None = Field(
        None, le=1e9, allow_inf_nan=False,
        description="relative sampling weight when a stage mixes datasets with mix: weights",
    )

    def template_spec(self) -> ComponentSpec | None:
        if isinstance(self.template, str):
            return ComponentSpec(name=self.template)
        return self.template

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LoraSpec(Strict):
    r: PositiveInt = Field(8, le=65536)
    alpha: PositiveFloat = Field(16.0, le=1e6)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="module-name suffixes; default: the decoder family's names"
    )


TuneMode = Literal["frozen", "full", "lora", "partial"]


class TuneSpec(Strict):
    """How one component is tuned in a stage. A bare string is the mode alone: ``frozen``."""

    mode: TuneMode
    lora: LoraSpec | None = None
    modules: list[str] | None = Field(None, description="partial: names of sub-modules to train")
    last_layers: PositiveInt | None = Field(None, le=100_000, description="partial: train the last k decoder layers")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "TuneSpec":
        if self.mode == "lora" and self.lora is None:
            self.lora = LoraSpec()
        if self.mode != "lora" and self.lora is not None:
            raise ValueError(f"'lora' options need mode 'lora' (mode is '{self.mode}')")
        if self.mode == "partial" and not (self.modules or self.last_layers):
            raise ValueError("mode 'partial' needs 'modules' (sub-module names) or 'last_layers' (k)")
        if self.mode != "partial" and (self.modules or self.last_layers):
            raise ValueError(f"'modules' / 'last_layers' need mode 'partial' (mode is '{self.mode}')")
        return self


class StageTune(Strict):
    """The tune mode of every component: all four are spelled out, nothing is guessed."""

    encoder: TuneSpec
    connector: TuneSpec
    fusion: TuneSpec
    decoder: TuneSpec
    embeddings: Literal["inherit", "frozen", "new_tokens", "all"] = Field(
        "inherit",
        description="the decoder's token embeddings (and untied output head): as the decoder's mode "
        "(inherit), frozen, only the rows of added tokens such as <image> (new_tokens, OpenFlamingo), "
        "or all rows (all, Otter)",
    )


class OptimizerSpec(Strict):
    name: Literal["adamw"] = "adamw"
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: PositiveFloat = Field(1e-8, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)


class InitFrom(Strict):
    """Weights loaded into the model when a stage starts (not when it resumes mid-way)."""

    format: Literal["openflamingo", "vlmkit"] = Field(
        description="openflamingo: an OpenFlamingo checkpoint (its key layout mapped onto vlmkit's); "
        "vlmkit: a vlmkit export folder's model.safetensors or a checkpoint's weights.safetensors"
    )
    path: str = Field(description="the checkpoint file (.pt/.pth/.bin read weights-only, or .safetensors)")
    added_tokens: list[str] = Field(
        ["<|endofchunk|>", "<image>", "<PAD>"],
        description="openflamingo: the tokens OpenFlamingo appended to the language model's vocabulary, in its "
        "order (its embedding rows are moved to vlmkit's ids of the same tokens; <PAD> is the pad token)",
    )
    strict: bool = Field(True, description="the checkpoint must cover every connector and fusion tensor")
    source: str = Field(
        "", description="where the file comes from (which release, where to download it): shown when it is missing"
    )


class StageSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="explicit stage name, e.g. align / instruct")
    enabled: bool = Field(True, description="false: skip this stage (e.g. when init_from replaces it)")
    init_from: InitFrom | None = Field(None, description="load these weights when the stage starts")
    data: list[str] = Field(min_length=1, description="names of entries in the recipe's `data` section")
    tune: StageTune
    optimizer: OptimizerSpec = OptimizerSpec()
    lr: LearningRate
    lr_per_component: dict[Literal["encoder", "connector", "fusion", "decoder"], LearningRate] = {}
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = Field(0, le=MAX_STEPS)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: PositiveFloat | None = Field(None, le=MAX_EPOCHS)
    max_steps: PositiveInt | None = Field(None, le=MAX_STEPS)
    batch_size: PositiveInt = Field(le=MAX_BATCH, description="samples per micro-batch over all processes (each of W processes takes batch_size / W)")
    grad_accum: PositiveInt = Field(1, le=MAX_BATCH, description="micro-batches per optimizer step: the global batch is batch_size * grad_accum")
    max_grad_norm: PositiveFloat | None = Field(1.0, le=1e6)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: PositiveInt = Field(1, le=MAX_STEPS)
    mix: Literal["size", "weights", "even"] | dict[str, PositiveInt] = Field(
        "size", description="with several datasets: size / weights / even: each micro-batch comes from one of "
        "them, drawn in proportion to their sizes, to their `weight`, or evenly; a mapping {dataset: count}: "
        "every optimizer step takes exactly `count` samples of each dataset (the counts add up to "
        "batch_size * grad_accum), laid out in the stage's data order and cut into its micro-batches"
    )
    max_length: PositiveInt | None = Field(
        None, le=MAX_TOKENS, description="tokens per sample; longer samples lose in-context examples from the front"
    )

    @field_validator("mix", mode="before")
    @classmethod
    def _mix_word(cls, value: Any) -> Any:
        if not isinstance(value, (str, dict)):
            raise ValueError(f"got {value!r}; allowed: {', '.join(MIX_MODES)}, or a mapping {{dataset: samples per "
                             "optimizer step}")
        if isinstance(value, str) and value not in MIX_MODES:
            raise ValueError(f"got {value!r}{suggest(value, MIX_MODES)} allowed: {', '.join(MIX_MODES)}, or a mapping "
                             "{dataset: samples per optimizer step}")
        if isinstance(value, dict):
            for alias, count in value.items():
                if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_BATCH:
                    raise ValueError(f"{alias}: got {count!r}; a per-step count is a whole number of samples, from 1 "
                                     f"to {MAX_BATCH:,}")
        return value

    @model_validator(mode="after")
    def _length(self) -> "StageSpec":
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("set exactly one of 'epochs' and 'max_steps'")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set at most one of 'warmup_steps' and 'warmup_ratio'")
        if isinstance(self.mix, dict):
            self._check_counts(self.mix)
        return self

    def _check_counts(self, counts: dict[str, int]) -> None:
        extra = [a for a in counts if a not in self.data]
        missing = [a for a in self.data if a not in counts]
        if extra or missing:
            raise ValueError(
                f"mix: a per-step count is needed for each dataset of the stage's data list and only those "
                f"(data: {', '.join(self.data)}; "
                + "; ".join(p for p in (extra and f"not in data: {', '.join(extra)}",
                                        missing and f"no count for: {', '.join(missing)}") if p) + ")"
            )
        total, step = sum(counts.values()), self.batch_size * self.grad_accum
        if total != step:
            raise ValueError(
                f"mix: the per-step counts add up to {total} samples, but a step is batch_size * grad_accum = "
                f"{self.batch_size} * {self.grad_accum} = {step}; make them equal"
            )


class RunSpec(Strict):
    """How the engine runs and saves, for every stage."""

    checkpoint_every: PositiveInt | None = Field(None, le=MAX_STEPS)
    """Save a resumable checkpoint every this many optimizer steps (and always at each stage end)."""
    keep_last: PositiveInt = Field(2, le=10**6)
    """Checkpoints kept in ``<output>/checkpoints`` (older ones are deleted after a newer is complete)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs ``pip install 'vlmkit[tensorboard]'``)."""
    export: bool = True
    """Write ``<output>/export`` at the end: the trained weights, tokenizer and recipe for ``vlmkit.load``."""
    merge_lora: bool = True
    """In the export, merge LoRA adapters into the base weights (else keep them separate)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (less memory, about 30% slower)."""
    num_workers: NonNegativeInt = Field(0, le=1024)
    """Data-loading worker processes per training process."""
    eval_before: bool = False
    """Also run the recipe's ``eval`` list on the untrained model, and print before/after tables."""
    eval_every: PositiveInt | None = Field(None, le=MAX_STEPS)
    """Also run the recipe's ``eval`` list every this many optimizer steps of every stage (results in
    ``eval/step-<global step>/``) and draw ``learning_curve.png``: each evaluator's values against
    the global step, with ``before`` and ``after``. Each evaluation costs what ``after`` costs."""
    cache_features: bool = False
    """Compute a frozen encoder's features once per image and keep them in memory for the run:
    keyed by a content hash of the preprocessed frame (and the autocast dtype), dropped when the
    encoder's weights change, never used in a stage that trains the encoder. Results are the same
    as without it; each stage reports its hits and misses."""
    feature_cache_mib: PositiveInt = Field(1024, le=2**20)
    """The feature cache's size limit (MiB, on the device the features are computed on); the least
    recently used features are dropped beyond it."""
    length_groups: PositiveInt = Field(1, le=MAX_BATCH)
    """Run each micro-batch as at most this many forward/backward passes over samples of similar
    length (each padded to its own longest sample) where that saves padded positions; the loss per
    trained token and the step are the same. 1: each micro-batch in one pass."""


class EvalSpec(BaseModel):
    """``{type: <registered evaluator>, <its options>}``, run after training and by ``recipes eval``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="registered evaluator (see `recipes components evaluator`)")
    name: str | None = Field(
        None, pattern=NAME_PATTERN,
        description="what the entry's results are called (eval/<label>/<name>.json, the tables); default: what the "
                    "evaluator calls them (its type), numbered from the second entry of one name on (instructions-2)")


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    extends: str | None = Field(None, description="a parent recipe (shipped name or path), deep-merged under this one")
    seed: int = Field(0, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    run: RunSpec = RunSpec()
    model: ModelSpec
    data: dict[str, DatasetSpec] = Field(min_length=1)
    stages: list[StageSpec] = Field(min_length=1)
    eval: list[EvalSpec] = []
    profiles: dict[str, dict[str, Any]] = {}
    default_profile: str | None = None
