"""The typed interfaces every component implements.

Each component is a ``torch.nn.Module`` subclass of one of the interfaces below, with a class
attribute ``Config``: a pydantic model (``extra="forbid"``) of its recipe section, without the
``name`` key. The builder (:mod:`vlmkit.core.compose`) builds each model component with
``Component.build(config, context)`` and wires the widths between them.

Building and reading weights are two steps (:class:`BuildContext`, :meth:`ModelComponent.build`):
the constructor ``Component(config)`` creates the architecture (parameters with their random or
default initialisation) and reads no weight file; :meth:`ModelComponent.load_weights` reads the
pretrained weights into it. The builder calls ``load_weights`` after the constructor, except when it
builds on the meta device (``recipes params``), where tensors have shapes but no storage: then it
is not called, so a component that reads its weights there is counted without reading them. A
component whose construction itself depends on the device (e.g. ``from_pretrained``, which builds
and loads in one call) overrides :meth:`ModelComponent.build` and reads ``context.meta`` there.

Tensor shapes use: ``B`` batch, ``T_img`` images per sample, ``F`` frames per image, ``N`` images
flattened over a batch, ``L`` text length, ``Q`` connector queries, ``C, H, W`` pixels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

__all__ = [
    "IMAGE_TOKEN",
    "END_OF_CHUNK",
    "BuildContext",
    "ModelComponent",
    "Layers",
    "Size",
    "ComponentConfig",
    "Preprocess",
    "VisionEncoder",
    "EncoderConfig",
    "Connector",
    "ConnectorConfig",
    "Fusion",
    "FusionConfig",
    "LanguageDecoder",
    "DecoderConfig",
    "Dataset",
    "DatasetConfig",
    "Sample",
    "Template",
    "TemplateConfig",
    "Evaluator",
    "EvaluatorConfig",
    "EvalContext",
    "EvalResult",
    "INTERFACES",
]


#: the marker a sample's text carries where an image goes (templates write it, fusions find it)
IMAGE_TOKEN = "<image>"
#: the end-of-chunk marker Otter/OpenFlamingo-style templates and prompts close an answer with
END_OF_CHUNK = "<|endofchunk|>"


class ComponentConfig(BaseModel):
    """Base of every component config: unknown keys are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


class Preprocess(BaseModel):
    """How pixels must be prepared for an encoder: resize to ``image_size`` square, scale to [0, 1],
    then normalise per channel with ``mean`` and ``std``."""

    model_config = ConfigDict(extra="forbid")

    image_size: PositiveInt
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# ---------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class BuildContext:
    """How the builder builds the model's components.

    ``meta``: on the meta device (``recipes params``): the constructor runs under
    ``torch.device("meta")``, so tensors get shapes and no storage, and no weights are read or
    downloaded (:meth:`ModelComponent.load_weights` is not called)."""

    meta: bool = False

    @property
    def reads_weights(self) -> bool:
        return not self.meta


class ModelComponent(nn.Module):
    """Base of the four model components (encoder, connector, fusion, decoder): construction and
    weight loading as two steps the builder drives."""

    @classmethod
    def build(cls, config: ComponentConfig, context: BuildContext) -> "ModelComponent":
        """The component for ``config`` as the builder makes it: ``cls(config)``, then
        :meth:`load_weights` unless ``context.meta``. Override only where the construction itself
        differs on the meta device (pass ``context.meta`` on to the constructor explicitly)."""
        component = cls(config)
        if context.reads_weights:
            component.load_weights()
        return component

    def load_weights(self) -> None:
        """Read pretrained weights (files, downloads) into the constructed architecture. Called once
        by the builder right after the constructor, never on the meta device. Default: nothing to
        read (the constructor's initialisation is the component's weights)."""


# ----------------------------------------------------------------------------------------- encoders
class EncoderConfig(ComponentConfig):
    pass


class VisionEncoder(ModelComponent, ABC):
    """Pixels ``(N, C, H, W)`` -> features ``(N, tokens, width)``."""

    kind: ClassVar[str] = "encoder"
    Config: ClassVar[type[ComponentConfig]] = EncoderConfig

    def __init__(self, config: ComponentConfig):
        super().__init__()
        self.config = config

    @property
    @abstractmethod
    def width(self) -> int:
        """Feature width of every output token."""

    @abstractmethod
    def num_tokens(self, image_size: int | None = None) -> int:
        """Tokens per image at ``image_size`` (default: ``preprocess.image_size``)."""

    @property
    @abstractmethod
    def preprocess(self) -> Preprocess:
        """The image size and normalisation this encoder expects."""

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels (N, C, H, W)`` normalised as :attr:`preprocess` says -> ``(N, tokens, width)``."""


#: a component's width, token or head count: at least 1, at most 1,000,000 (a typo such as 1e15
#: is refused when the recipe validates, not when the allocator gives up)
Size = Annotated[int, Field(gt=0, le=1_000_000)]
#: a component's number of layers: at least 1, at most 1,000 (10**12 layers would build forever)
Layers = Annotated[int, Field(gt=0, le=1_000)]


# --------------------------------------------------------------------------------------- connectors
class ConnectorConfig(ComponentConfig):
    """Widths are filled in by the builder (encoder width in, decoder width out) unless the recipe
    sets them; a set width that disagrees with the component it meets is an error."""

    width_in: Size | None = None
    width_out: Size | None = None


class Connector(ModelComponent, ABC):
    """Encoder features ``(N, tokens, width_in)`` -> ``(N, queries, width_out)``.

    ``tokens`` may hold ``num_frames`` frames of one image (video), frame-major:
    ``(N, F * tokens_per_frame, width_in)``. A connector that does not model time treats them as one
    sequence.

    The contract a connector (built-in or plug-in) keeps:

    - ``Config`` subclasses :class:`ConnectorConfig`: the builder fills ``width_in`` (the encoder's
      width) and ``width_out`` (what the fusion asks for) and constructs ``Connector(config)``;
      ``__init__`` calls ``super().__init__(config)``, which refuses a config without both widths.
    - :meth:`forward` accepts ``features``, ``num_frames`` and ``media_positions`` (keyword), even
      if it ignores the last two.
    - :meth:`num_queries` says exactly how many tokens :meth:`forward` returns per image: the
      builder checks it with a dry forward on one zero image's features when the model is built
      (:func:`vlmkit.core.compose.build_model`), so a disagreement is a build error naming the
      connector, not a shape error in the middle of a run.
    - Optional: ``lora_target_modules() -> list[str]``, the module-name suffixes LoRA adapts when a
      stage tunes the connector with ``lora`` and names no ``target_modules``; without it such a
      stage must name them.
    """

    kind: ClassVar[str] = "connector"
    Config: ClassVar[type[ComponentConfig]] = ConnectorConfig

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        if config.width_in is None or config.width_out is None:
            raise ValueError(f"{type(self).__name__} needs width_in and width_out (the builder sets them)")
        self.config = config

    @property
    def width_in(self) -> int:
        return int(self.config.width_in)

    @property
    def width_out(self) -> int:
        return int(self.config.width_out)

    @abstractmethod
    def num_queries(self, num_tokens_in: int, num_frames: int = 1) -> int:
        """Output tokens per image for ``num_tokens_in`` input tokens per frame."""

    @abstractmethod
    def forward(
        self, features: torch.Tensor, num_frames: int = 1, media_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``features (N, F * tokens, width_in)`` -> ``(N, queries, width_out)``.

        ``media_positions (N,)`` (long): each image's index among its sample's images (0, 1, ...),
        for connectors with media-time embeddings; others ignore it."""


# ------------------------------------------------------------------------------------------ fusions
class FusionConfig(ComponentConfig):
    pass


class Fusion(ModelComponent, ABC):
    """How connector outputs enter the decoder.

    :meth:`attach` is called once by the builder (a fusion may add modules to the decoder there);
    :meth:`forward` then runs the decoder on a batch with its media.
    """

    kind: ClassVar[str] = "fusion"
    Config: ClassVar[type[ComponentConfig]] = FusionConfig

    def __init__(self, config: ComponentConfig):
        super().__init__()
        self.config = config

    @abstractmethod
    def attach(self, decoder: "LanguageDecoder", media_width: int) -> None:
        """Bind to the decoder; ``media_width`` is the connector's output width."""

    def media_width(self, decoder_width: int, encoder_width: int) -> int:
        """The connector output width this fusion takes when the recipe does not set
        ``model.connector.width_out`` (default: the decoder's width)."""
        return decoder_width

    @abstractmethod
    def placeholder_tokens(self, tokens_per_image: int) -> int:
        """How many ``<image>`` tokens stand for one image in the text (the collator expands each
        ``<image>`` marker to this many)."""

    @abstractmethod
    def forward(
        self,
        decoder: "LanguageDecoder",
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        media_mask: torch.Tensor,
        **decoder_kwargs: Any,
    ) -> Any:
        """Run the decoder.

        ``input_ids, attention_mask``: ``(B, L)``; ``media``: ``(B, T_img, Q, d)`` connector
        outputs; ``media_mask``: ``(B, T_img)`` bool, True for real (not padded) images;
        ``decoder_kwargs`` (``logits_to_keep``, ``use_cache``) pass on to the decoder.
        Returns the decoder's output with ``logits (B, L, vocab)``. A fusion computes no loss: the
        training step does (:mod:`vlmkit.core.engine.step`) from the collator's labels, which
        already leave the ``<image>`` positions untrained.
        """

    @abstractmethod
    def generate(
        self,
        decoder: "LanguageDecoder",
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        media_mask: torch.Tensor,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Continue left-padded prompts ``input_ids (B, L)`` conditioned on ``media (B, T_img, Q, d)``
        with the decoder's ``generate`` (KV cache on by default; ``generate_kwargs`` such as
        ``max_new_tokens``, ``num_beams``, ``eos_token_id`` pass through). Returns only the new
        tokens ``(B * num_return_sequences, new)``."""


# ----------------------------------------------------------------------------------------- decoders
class DecoderConfig(ComponentConfig):
    pass


class LanguageDecoder(ModelComponent, ABC):
    """A causal language model driven by input embeddings."""

    kind: ClassVar[str] = "decoder"
    Config: ClassVar[type[ComponentConfig]] = DecoderConfig

    def __init__(self, config: ComponentConfig):
        super().__init__()
        self.config = config
        #: ids of the tokens added after loading (special tokens of fusions and templates, a pad
        #: token): the rows a stage with ``tune.embeddings: new_tokens`` trains.
        self.new_token_ids: list[int] = []

    def get_output_embeddings(self) -> nn.Module | None:
        """The output projection ``(vocab, width)`` if the model has one separate from the input
        embeddings (untied), else ``None``."""
        return None

    @property
    def supports_logits_to_keep(self) -> bool:
        """Whether :meth:`forward` takes ``logits_to_keep``, a ``(B, L)`` bool mask, and then returns
        ``logits (num_true, vocab)`` for those positions only (the engine asks for the positions that
        predict a trained token, so prompts and images skip the vocabulary projection), and
        ``use_cache=False``. Default: no."""
        return False

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """A ``transformers`` tokenizer (``PreTrainedTokenizerBase``)."""

    @property
    @abstractmethod
    def width(self) -> int:
        """Hidden size: the width of the input embeddings."""

    @abstractmethod
    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table ``(vocab, width)``."""

    @abstractmethod
    def add_special_tokens(self, tokens: list[str]) -> dict[str, int]:
        """Add tokens the tokenizer lacks, resize the embeddings, record the new ids in
        :attr:`new_token_ids`, return token -> id for all of them."""

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The transformer blocks in order (a fusion may wrap them)."""

    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module-name suffixes LoRA adapts by default for this model family."""

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template, if it has one."""
        return getattr(self.tokenizer, "chat_template", None)

    @abstractmethod
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """``inputs_embeds (B, L, width)`` -> a causal-LM output with ``logits (B, L, vocab)`` and,
        with ``labels (B, L)`` (-100 = ignored), the shifted cross-entropy ``loss``."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (``run.gradient_checkpointing``)."""
        from vlmkit.core.errors import VlmkitError

        raise VlmkitError(f"run.gradient_checkpointing: decoder {type(self).__name__} does not support it")

    def generation_module(self) -> nn.Module:
        """The module that ``generate`` calls once per step with that step's ``input_ids`` chunk
        (fusions hook it to follow generation); by default the decoder itself."""
        return self

    @abstractmethod
    def generate(self, **generate_kwargs: Any) -> torch.Tensor:
        """transformers-style ``generate`` (``input_ids`` or ``inputs_embeds``, ``attention_mask``,
        ``past_key_values`` handling, ``max_new_tokens``, ``num_beams`` ...). With ``inputs_embeds``
        alone it returns only the new tokens."""


# ----------------------------------------------------------------------------------------- datasets
class DatasetConfig(ComponentConfig):
    pass


@dataclass
class Sample:
    """One training sample as text, before tokenisation (what a template renders).

    ``segments`` are ``(text, trained)`` pairs rendered in order. The collator tokenises the whole
    text once (as the original projects do) and the loss covers exactly the tokens that hold a
    character of a trained segment (end-of-answer markers included by the template). ``<image>`` in the text
    marks where each of ``images`` goes, in order; an image is a PIL image or a list of PIL frames
    (a video clip). ``units`` lists the in-context examples that truncation may drop, oldest first,
    each as ``(first segment, end segment, first image, end image)`` (end exclusive).
    """

    id: str
    images: list[Any] = field(default_factory=list)
    segments: list[tuple[str, bool]] = field(default_factory=list)
    units: list[tuple[int, int, int, int]] = field(default_factory=list)


class Dataset(ABC):
    """A map-style dataset of :class:`vlmkit.core.data.records.Record` (conversations with media;
    a template renders them) or, for ready-made text, :class:`Sample`.

    Bad records: a dataset that can meet them (a missing image, a malformed entry) offers the
    recipe option ``on_error: skip | fail``. Under ``skip`` it leaves such records out, counts
    them by kind and reports them through :meth:`error_report` and :meth:`summary` (the engine
    prints the summary at the end of each stage); under ``fail`` the first one is an error that
    names the record. :class:`vlmkit.core.data.skips.SkippingReads` implements reading past records
    whose problem shows only when they are read (marks shared with DataLoader workers). A dataset
    that never skips keeps the defaults: nothing skipped."""

    kind: ClassVar[str] = "dataset"
    Config: ClassVar[type[ComponentConfig]] = DatasetConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Any: ...

    def error_report(self) -> dict[str, list[str]]:
        """Kind of problem -> ids of the records skipped for it so far (``{}``: none skipped)."""
        return {}

    def summary(self) -> str:
        """One line on what was skipped, e.g. ``"mimicit X.json: skipped 2 records (bad_image 2):
        first ids a, b"`` (:func:`vlmkit.core.data.skips.skip_summary`); ``""`` when nothing was."""
        return ""


# ---------------------------------------------------------------------------------------- templates
class TemplateConfig(ComponentConfig):
    pass


class Template(ABC):
    """A chat format: renders a :class:`~vlmkit.core.data.records.Record` into a :class:`Sample`
    whose trained segments are exactly the answers and their end markers."""

    kind: ClassVar[str] = "template"
    Config: ClassVar[type[ComponentConfig]] = TemplateConfig
    #: special tokens the decoder must know (added by the builder), ``<image>`` always among them
    special_tokens: ClassVar[tuple[str, ...]] = (IMAGE_TOKEN,)
    #: tokens that end an answer besides the tokenizer's end of sequence (generation stops there)
    stop_tokens: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ComponentConfig):
        self.config = config

    @abstractmethod
    def render(self, record: Any, tokenizer: Any) -> Sample:
        """``record`` -> segments; ``tokenizer`` gives the end-of-sequence text and, for the
        ``chat_template`` template, the model's own chat template."""


# --------------------------------------------------------------------------------------- evaluators
class EvaluatorConfig(ComponentConfig):
    """Options of an entry of a recipe's ``eval`` list (besides ``type``)."""


@dataclass
class EvalContext:
    """What an evaluator gets besides the model.

    ``datasets``: recipe data alias -> its dataset (records or samples); ``templates``: alias -> the
    chat template that renders it; ``output_dir``: where the evaluator may write extra files;
    ``label``: which evaluation this is (``before``, ``after`` or a name given on the command line);
    ``progress``: show progress bars."""

    datasets: dict[str, Any]
    templates: dict[str, Any]
    output_dir: Any
    label: str = "eval"
    progress: bool = True


@dataclass
class EvalResult:
    """What an evaluator measured.

    ``metrics``: row name -> value (e.g. ``{"all": 0.83, "colour": 0.9}``), what the tables compare
    between evaluations; ``counts``: row name -> number of items behind the value; ``metric``: what
    the values are (e.g. ``exact-answer accuracy``); ``items``: one JSON-ready dict per evaluated item
    (id, prompt, reference, prediction, correct ...), written to the results file; ``examples``: the
    ids of the items worth showing a person; ``curves``: for results that vary a quantity (shots, a
    ratio), curve name -> {x: value}, drawn as lines against ``x_label`` (else the metrics are bars)."""

    name: str
    metric: str
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    curves: dict[str, dict[str, float]] = field(default_factory=dict)
    x_label: str = ""


class Evaluator(ABC):
    """An evaluation a recipe's ``eval`` list names (``{type: <name>, <options>}``); run after
    training, by ``recipes eval``, and (``run.eval_before``) on the untrained model."""

    kind: ClassVar[str] = "evaluator"
    Config: ClassVar[type[ComponentConfig]] = EvaluatorConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    def data_aliases(self) -> list[str]:
        """The recipe data entries it reads (checked against the recipe's ``data`` section)."""
        return []

    @abstractmethod
    def evaluate(self, model: Any, context: EvalContext) -> EvalResult:
        """Evaluate ``model`` (a :class:`vlmkit.core.compose.VisionLanguageModel` in eval mode)."""


from vlmkit.llm_backends.base import LLMBackend  # noqa: E402 - data generation's kind, defined with its backends

#: kind -> interface class
INTERFACES: dict[str, type] = {
    "encoder": VisionEncoder,
    "connector": Connector,
    "fusion": Fusion,
    "decoder": LanguageDecoder,
    "dataset": Dataset,
    "template": Template,
    "evaluator": Evaluator,
    "llm_backend": LLMBackend,
}
