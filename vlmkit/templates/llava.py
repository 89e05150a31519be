"""The LLaVA templates (REFERENCE 1.2): ``llava_plain`` (stage 1) and ``vicuna_v1`` (stage 2).

``llava_plain``
    Each exchange is ``<image>{caption}\\n``: the exchange's media markers, then the caption (the
    assistant text; the instruction is discarded) and the separator. LLaVA's ``preprocess_plain``
    builds ``<image>`` + caption + ``conv_llava_plain.sep`` (``"\\n"``) and masks only the tokens of
    ``<image>``; it adds no EOS (``tokenizer_image_token`` writes BOS only). Trained: the caption
    and its ``\\n``. Options: ``separator`` (default ``"\\n"``), ``eos`` (default false: append the
    tokenizer's EOS, trained, after the separator). Like LLaVA (``assert len(source) == 2``), an
    exchange must be one user/assistant pair. Units: one per in-context example (its markers,
    caption, separator). A ``shared_media`` record marks its media once, before the first caption.

``vicuna_v1``
    LLaVA's ``conv_vicuna_v1`` (``SeparatorStyle.TWO``, ``sep=" "``, ``sep2="</s>"``)::

        {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

    with LLaVA's default system line and ``</s>`` the tokenizer's EOS text. The ``<image>\\n``
    markers (one per media; LLaVA's ``preprocess_multimodal`` moves the image to the start of the
    first user message followed by ``\\n``) open the first user turn of the exchange that owns the
    media; a text-only exchange has none; a ``shared_media`` record puts them in the first user
    turn of the conversation. In-context examples are earlier rounds of the same conversation.
    Trained: each answer with its leading space and its ``</s>``, i.e. ``" {a}</s>"``. LLaVA's
    ``preprocess_v1`` masks the instruction up to ``"ASSISTANT:"`` (its ``- 2`` leaves the token that
    carries the space before the answer trained), and at generation the prompt ends with
    ``"ASSISTANT:"``. ``train_context_answers`` (default true, as LLaVA trains every round) can
    restrict the loss to the query's answers. The text after the system line is laid out so that
    each in-context example is a unit ending with the ``"USER: "`` that opens the next round: dropping
    it leaves exactly the conversation without that example.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vlmkit.templates.base import (
    SampleBuilder,
    check_record,
    eos_text,
    exchanges,
    pairs,
    record_error,
    shared_media,
)
from vlmkit.core.interfaces import Sample, Template, TemplateConfig

#: LLaVA's conv_vicuna_v1 system line
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class LlavaPlainConfig(TemplateConfig):
    separator: str = "\n"
    """Written (trained) after each caption: LLaVA's plain separator."""
    eos: bool = False
    """Also end each caption with the tokenizer's EOS (trained); LLaVA does not."""


class LlavaPlainTemplate(Template):
    Config: ClassVar[type[TemplateConfig]] = LlavaPlainConfig

    def render(self, record: Any, tokenizer: Any) -> Sample:
        check_record(record, "llava_plain")
        end = self.config.separator + (eos_text(tokenizer, "llava_plain") if self.config.eos else "")
        captions = []
        for where, ex in exchanges(record):
            turns = pairs(record, ex, where)
            if len(turns) != 1:
                raise record_error(
                    record,
                    f"{where}: llava_plain renders one caption per exchange, this one has {len(turns)} "
                    "user/assistant pairs",
                )
            captions.append((ex, turns[0][1]))
        b = SampleBuilder(record)
        if record.shared_media:
            b.add(b.media(shared_media(record)))
        last = len(captions) - 1
        for k, (ex, caption) in enumerate(captions):
            if k == last:
                self._caption(b, record.shared_media, ex, caption, end)
            else:
                with b.unit():
                    self._caption(b, record.shared_media, ex, caption, end)
        return b.build()

    @staticmethod
    def _caption(b: SampleBuilder, shared: bool, ex: Any, caption: str, end: str) -> None:
        if not shared:
            b.add(b.media(ex.media))
        b.add(caption + end, True)


class VicunaV1Config(TemplateConfig):
    system: str = VICUNA_SYSTEM
    """The system line (LLaVA's conv_vicuna_v1 default); empty: none, and no space after it."""
    train_context_answers: bool = True
    """Train the answers of the in-context examples (earlier rounds) too."""


class VicunaV1Template(Template):
    Config: ClassVar[type[TemplateConfig]] = VicunaV1Config

    def render(self, record: Any, tokenizer: Any) -> Sample:
        check_record(record, "vicuna_v1")
        eos = eos_text(tokenizer, "vicuna_v1")
        checked = [(ex, pairs(record, ex, where)) for where, ex in exchanges(record)]
        b = SampleBuilder(record)
        head = f"{self.config.system} USER: " if self.config.system else "USER: "
        if record.shared_media:
            head += b.media(shared_media(record), after="\n")
        b.add(head)
        last = len(checked) - 1
        for k, (ex, turns) in enumerate(checked):
            trained = k == last or self.config.train_context_answers
            if k == last:
                self._rounds(b, record.shared_media, ex, turns, trained, eos, final=True)
            else:
                with b.unit():
                    self._rounds(b, record.shared_media, ex, turns, trained, eos, final=False)
        return b.build()

    @staticmethod
    def _rounds(
        b: SampleBuilder, shared: bool, ex: Any, turns: list[tuple[str, str]], trained: bool, eos: str, final: bool
    ) -> None:
        # "USER: " of the first round is already written (the head, or the end of the unit before)
        for i, (question, answer) in enumerate(turns):
            markers = b.media(ex.media, after="\n") if i == 0 and not shared else ""
            b.add(f"{markers}{question} ASSISTANT:")
            b.add(f" {answer}{eos}", trained)
            if not (final and i == len(turns) - 1):
                b.add("USER: ")
