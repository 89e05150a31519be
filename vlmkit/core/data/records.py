"""What datasets yield and templates read: conversations with their media, before any text format.

A :class:`Record` is one training sample: a query :class:`Exchange` (one or more user/assistant
turns about its media) and, for in-context learning, the example exchanges that precede it. A
template (:class:`vlmkit.core.interfaces.Template`) renders it into a
:class:`~vlmkit.core.interfaces.Sample`: text segments marked trained or not, ``<image>`` markers,
and the media in marker order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

@dataclass
class Media:
    """One image (one frame) or one video clip (``F`` frames, in time order); PIL images."""

    id: str
    frames: list[Any]


@dataclass
class Turn:
    role: Literal["user", "assistant"]
    text: str


@dataclass
class Exchange:
    """User/assistant turns (alternating, starting with the user) and the media they are about.

    ``media`` go where the template puts ``<image>`` markers: before the exchange's first user
    turn, in order. A text-only exchange has none.

    ``references``: every acceptable answer to the exchange's last question, for evaluations that
    score against several (VQA's 10 human answers, all captions of a picture); empty: the last
    assistant turn is the only reference. Templates never render them."""

    turns: list[Turn]
    media: list[Media] = field(default_factory=list)
    id: str = ""
    references: list[str] = field(default_factory=list)

    def reference_answers(self) -> list[str]:
        """``references``, or the last assistant turn's text when there are none (``[]`` if the
        exchange has no assistant turn)."""
        if self.references:
            return list(self.references)
        return [t.text for t in reversed(self.turns) if t.role == "assistant"][:1]


@dataclass
class Record:
    """A query exchange and its in-context examples (oldest first).

    ``shared_media``: the in-context examples are other instructions about the query's own media
    (MIMIC-IT's same-image mode): the media appear once, before the first example."""

    id: str
    query: Exchange
    context: list[Exchange] = field(default_factory=list)
    shared_media: bool = False


def unencodable_text(value: Any, where: str = "") -> str | None:
    """The first string in ``value`` (a JSON value: str, list, dict) that is not valid Unicode text
    (a lone surrogate such as ``"\\ud800"``, which JSON escapes can spell but no tokenizer or UTF-8
    file takes), described as ``"'<field>' holds ... at character N"``; ``None`` when every string
    encodes. ``where`` names ``value`` (``caption``, ``conversations[1].value``)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            char = value[error.start]
            return (f"'{where or 'text'}' holds an invalid character (lone surrogate U+{ord(char):04X}) at "
                    f"character {error.start}; text must be valid Unicode (UTF-8)")
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = printable(str(key))
            path = f"{where}.{name}" if where else name
            if name != str(key):
                return f"the field name '{path}' holds an invalid character (lone surrogate); text must be valid Unicode (UTF-8)"
            found = unencodable_text(item, path)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = unencodable_text(item, f"{where}[{i}]")
            if found:
                return found
    return None


def printable(text: str) -> str:
    """``text`` with anything that is not valid Unicode (lone surrogates) written as ``\\udXXX``
    escapes, so that a message naming it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
