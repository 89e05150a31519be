"""The Otter / MIMIC-IT template (REFERENCE 1.1, 1.6).

Every user/assistant pair is one chunk::

    User: {instruction} GPT:<answer> {answer}<|endofchunk|>

rendered for each in-context example, oldest first, then for the query, and the tokenizer's EOS
closes the sequence. A multi-turn exchange gives one chunk per pair.

Media markers (MIMIC-IT's in-context modes):

- ``record.shared_media`` (same image or video, other instructions): the query's media appear once,
  ``<image>`` before the first chunk, and no chunk has its own marker;
- otherwise each exchange's media are marked before its first chunk (``<image>`` per media, none
  for a text-only exchange).

A video clip is one media (its frames on the F axis) and so one ``<image>``.

Loss (Otter's ``train/instruction_following.py`` masks everything up to each ``<answer>`` and from
each ``<|endofchunk|>`` to the next ``<answer>``, and drops ``<answer>``/``<image>`` from the loss):
trained are the span after each ``<answer>`` through its ``<|endofchunk|>`` -- the leading space
included, which is how the model continues a ``GPT:<answer>`` prompt -- and the final EOS, which
Otter's dataset appends after the last chunk (``cat([bos, text, eos])``) and leaves unmasked.
Otter trains the answers of the in-context examples as well as the query's: ``train_context_answers``
(default true) keeps that; false trains only the query's chunks and the EOS.

Units: one per in-context example, its chunks (and, unless shared, its markers and media). The
leading shared ``<image>`` is outside every unit, so dropping examples keeps it.
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
from vlmkit.core.interfaces import END_OF_CHUNK, IMAGE_TOKEN, Sample, Template, TemplateConfig

ANSWER = "<answer>"


class OtterConfig(TemplateConfig):
    train_context_answers: bool = True
    """Train the answers of the in-context examples too (Otter does); false: only the query's."""


class OtterTemplate(Template):
    Config: ClassVar[type[TemplateConfig]] = OtterConfig
    special_tokens: ClassVar[tuple[str, ...]] = (IMAGE_TOKEN, ANSWER, END_OF_CHUNK)
    stop_tokens: ClassVar[tuple[str, ...]] = (END_OF_CHUNK,)

    def render(self, record: Any, tokenizer: Any) -> Sample:
        check_record(record, "otter")
        eos = eos_text(tokenizer, "otter")
        named = exchanges(record)
        checked = [(ex, pairs(record, ex, where)) for where, ex in named]
        b = SampleBuilder(record)
        if record.shared_media:
            b.add(b.media(shared_media(record)))
        last = len(checked) - 1
        for k, (ex, turns) in enumerate(checked):
            trained = k == last or self.config.train_context_answers
            if k == last:
                self._chunks(b, record.shared_media, ex, turns, trained)
            else:
                with b.unit():
                    self._chunks(b, record.shared_media, ex, turns, trained)
        b.add(eos, True)
        return b.build()

    @staticmethod
    def _chunks(b: SampleBuilder, shared: bool, ex: Any, turns: list[tuple[str, str]], trained: bool) -> None:
        if not shared:
            b.add(b.media(ex.media))
        for question, answer in turns:
            b.add(f"User: {question} GPT:{ANSWER}")
            b.add(f" {answer}{END_OF_CHUNK}", trained)
