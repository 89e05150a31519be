"""Turning an LLM answer into instruction-response pairs, by the task's output format.

``qa_pairs``: the answer holds blocks ``<question marker> text`` then ``<answer marker> text``
(markers matched at line starts, case-insensitive, after optional list numbering or ``**``); each
question followed by an answer is a pair. ``description``: the whole answer is the response to one
instruction picked (deterministically, by the item id) from the task's instruction list."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OutputFormat", "ParseError", "parse_answer"]


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["qa_pairs", "description"]
    question_marker: str = "Question:"
    answer_marker: str = "Answer:"
    instructions: list[str] = []
    """``description``: the instructions a description answers (one is picked per item)."""
    max_pairs: int = Field(8, ge=1)
    """``qa_pairs``: pairs kept per answer (later ones are rejected as ``extra_pair``)."""

    @model_validator(mode="after")
    def _check(self) -> "OutputFormat":
        if self.format == "description" and not self.instructions:
            raise ValueError("format 'description' needs a list of 'instructions'")
        if self.format == "qa_pairs" and self.instructions:
            raise ValueError("'instructions' belong to format 'description'")
        if self.question_marker.strip().lower() == self.answer_marker.strip().lower():
            raise ValueError("question_marker and answer_marker must differ")
        return self


class ParseError(ValueError):
    """An answer with no usable pair; the message says what was missing."""


def _marker_re(marker: str) -> str:
    return r"^[ \t]*(?:\d+[.)][ \t]*|[-*][ \t]+)?(?:\*\*)?" + re.escape(marker.strip()) + r"(?:\*\*)?[ \t]*"


def parse_answer(text: str, output: OutputFormat, item_id: str) -> list[tuple[str, str]]:
    """Every pair found, in order (the pipeline rejects those beyond ``max_pairs`` as ``extra_pair``)."""
    if output.format == "description":
        body = text.strip()
        if not body:
            raise ParseError("the answer is empty")
        pick = int(hashlib.sha256(item_id.encode("utf-8")).hexdigest(), 16) % len(output.instructions)
        return [(output.instructions[pick], body)]
    q = re.compile(_marker_re(output.question_marker), re.IGNORECASE | re.MULTILINE)
    a = re.compile(_marker_re(output.answer_marker), re.IGNORECASE | re.MULTILINE)
    marks = sorted([(m.start(), m.end(), "q") for m in q.finditer(text)] + [(m.start(), m.end(), "a") for m in a.finditer(text)])
    pairs: list[tuple[str, str]] = []
    for i, (start, end, kind) in enumerate(marks):
        if kind != "q" or i + 1 >= len(marks) or marks[i + 1][2] != "a":
            continue
        question = text[end:marks[i + 1][0]].strip()
        stop = marks[i + 2][0] if i + 2 < len(marks) else len(text)
        answer = text[marks[i + 1][1]:stop].strip()
        pairs.append((_clean(question), _clean(answer)))
    if not pairs:
        raise ParseError(f"no '{output.question_marker}' line followed by an '{output.answer_marker}' line")
    return pairs


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("**", "")).strip()
