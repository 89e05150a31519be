"""The mPLUG-Owl template (REFERENCE 1.3)::

    {system}\\nHuman: <image>\\nHuman: {q1}\\nAI: {a1}</s>\\nHuman: {q2}\\nAI: {a2}</s>

The system line defaults to mPLUG-Owl's. Each media of an exchange is a ``\\nHuman: <image>`` line
before the exchange's first question (none for a text-only exchange); a ``shared_media`` record has
them once, right after the system line. In-context examples are earlier rounds of the conversation.

Loss: mPLUG-Owl's ``_extract_text_token_from_conversation`` splits the text on ``"AI: "`` and
``"\\nHuman: "``, labels the chunk after each ``"AI: "`` and appends the EOS token to it (labelled
too), after every answer, not only the last. So the trained segments are ``"{a}</s>"`` (``</s>`` =
the tokenizer's EOS text) and ``"AI: "`` with its space stays untrained, as in the reference (its
generation prompt ends with ``"AI: "``). The collator tokenises the whole text, where a BPE
tokenizer merges that space into the answer's first token (``'ĠA'``); that token holds trained
characters and is trained, and a generation prompt ends before it (on ``':'``), as in training.
``train_context_answers`` (default true) can restrict the loss to the query's answers. Units: one per in-context example, its ``\\nHuman:`` lines and answers.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vlmkit.templates.base import (
    SampleBuilder,
    check_record,
    eos_text,
    exchanges,
    pairs,
    shared_media,
)
from vlmkit.core.interfaces import Sample, Template, TemplateConfig

MPLUG_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


class MplugOwlConfig(TemplateConfig):
    system: str = MPLUG_SYSTEM
    """The line before the conversation (mPLUG-Owl's by default)."""
    train_context_answers: bool = True
    """Train the answers of the in-context examples (earlier rounds) too."""


class MplugOwlTemplate(Template):
    Config: ClassVar[type[TemplateConfig]] = MplugOwlConfig

    def render(self, record: Any, tokenizer: Any) -> Sample:
        check_record(record, "mplug_owl")
        eos = eos_text(tokenizer, "mplug_owl")
        checked = [(ex, pairs(record, ex, where)) for where, ex in exchanges(record)]
        b = SampleBuilder(record)
        b.add(self.config.system)
        if record.shared_media:
            b.add(b.media(shared_media(record), before="\nHuman: "))
        last = len(checked) - 1
        for k, (ex, turns) in enumerate(checked):
            trained = k == last or self.config.train_context_answers
            if k == last:
                self._rounds(b, record.shared_media, ex, turns, trained, eos)
            else:
                with b.unit():
                    self._rounds(b, record.shared_media, ex, turns, trained, eos)
        return b.build()

    @staticmethod
    def _rounds(
        b: SampleBuilder, shared: bool, ex: Any, turns: list[tuple[str, str]], trained: bool, eos: str
    ) -> None:
        if not shared:
            b.add(b.media(ex.media, before="\nHuman: "))
        for question, answer in turns:
            b.add(f"\nHuman: {question}\nAI: ")
            b.add(f"{answer}{eos}", trained)
