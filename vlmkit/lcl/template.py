"""The link-context learning template (REFERENCE 1.5)::

    {system} [BEGIN EXAMPLE] What is in the image <image>? ASSISTANT: there is "{label}" in the image. [END EXAMPLE] ...
    [FINAL QUESTION]: Based on the previous examples, what is in the image <image>? ASSISTANT: {answer}</s>

(one line here; the pieces are joined by single spaces). The system line defaults to the reference's
("You should find the causal relationship between ... [FINAL QUESTION]."). ``</s>`` is the
tokenizer's EOS text.

Records: every in-context example and the query is an exchange with exactly one media (the
image; a clip is one media too) and one user/assistant pair. The user text is not rendered (the
questions are the reference's fixed ones); the assistant text is the label: the example's class
name (an invented name for the novel concept, the real name for the hard negative) and, in the
query, the expected name. ``shared_media`` does not apply (each example has its own image).

The answers are phrased as in the reference code (``policy_2way_weight``): an example's answer is
``context_answer`` with ``{label}`` replaced, followed by `` [END EXAMPLE]``; the final answer is
``final_answer`` with ``{label}`` replaced (the reference uses the same sentence without
``[END EXAMPLE]``; set ``final_answer: "{label}"`` to train on the bare name).

Loss: only the final answer -- its leading space (the prompt ends with ``ASSISTANT:``), the
sentence, and the EOS. The examples are not trained, unless ``train_repeated_labels`` is on: then
the answer of an example whose label already appeared earlier is trained too (its leading space and
sentence, not `` [END EXAMPLE]``).

Where the reference code differs from REFERENCE 1.5's string, REFERENCE is followed: the code builds
each example with its FastChat/vicuna conversation templates (a ``USER: `` before each question and
``</s>`` after each example), REFERENCE's template (used here) has neither.

Units: one per in-context example, the example and the space after it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import field_validator

from vlmkit.templates.base import (
    IMAGE,
    SampleBuilder,
    check_record,
    eos_text,
    exchanges,
    pairs,
    record_error,
)
from vlmkit.core.interfaces import Sample, Template, TemplateConfig

LCL_SYSTEM = (
    "You should find the causal relationship between the examples I am going to show you. "
    "And use that to answer to the [FINAL QUESTION]."
)
EXAMPLE_QUESTION = f"[BEGIN EXAMPLE] What is in the image {IMAGE}? ASSISTANT:"
END_EXAMPLE = "[END EXAMPLE]"
FINAL_QUESTION = f"[FINAL QUESTION]: Based on the previous examples, what is in the image {IMAGE}? ASSISTANT:"


class LCLConfig(TemplateConfig):
    system: str = LCL_SYSTEM
    """The system line (the reference's causal_v1.0 line); empty: none."""
    context_answer: str = 'there is "{label}" in the image.'
    """An in-context example's answer; ``{label}`` is its assistant text. `` [END EXAMPLE]`` follows."""
    final_answer: str = 'there is "{label}" in the image.'
    """The trained final answer; ``{label}`` is the query's assistant text."""
    train_repeated_labels: bool = False
    """Also train the answer of every example whose label an earlier example already showed (it is
    predictable from the link alone): a denser signal than the final answer. The reference trains
    only the final answer (off)."""

    @field_validator("context_answer", "final_answer")
    @classmethod
    def _has_label(cls, value: str) -> str:
        if "{label}" not in value:
            raise ValueError("must contain {label}")
        return value


class LCLTemplate(Template):
    Config: ClassVar[type[TemplateConfig]] = LCLConfig

    def render(self, record: Any, tokenizer: Any) -> Sample:
        check_record(record, "lcl")
        eos = eos_text(tokenizer, "lcl")
        if record.shared_media:
            raise record_error(record, "the lcl template needs one image per example; shared_media does not apply")
        labelled = []
        for where, ex in exchanges(record):
            turns = pairs(record, ex, where)
            if len(turns) != 1:
                raise record_error(record, f"{where}: lcl needs one user/assistant pair, got {len(turns)}")
            if len(ex.media) != 1:
                raise record_error(record, f"{where}: lcl needs exactly one image, got {len(ex.media)} media")
            labelled.append((ex, turns[0][1]))
        cfg = self.config
        b = SampleBuilder(record)
        if cfg.system:
            b.add(cfg.system + " ")
        *context, (query, label) = labelled
        shown: set[str] = set()
        for ex, example_label in context:
            with b.unit():
                b.media(ex.media)
                answer = cfg.context_answer.replace("{label}", example_label)
                b.add(EXAMPLE_QUESTION)
                b.add(f" {answer}", cfg.train_repeated_labels and example_label in shown)
                b.add(f" {END_EXAMPLE} ")
            shown.add(example_label)
        b.media(query.media)
        b.add(FINAL_QUESTION)
        b.add(" " + cfg.final_answer.replace("{label}", label) + eos, True)
        return b.build()
