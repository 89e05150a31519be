"""What the chat templates share: record checks, the media of a sample, and a sample builder.

A template turns a :class:`~vlmkit.core.data.records.Record` into a
:class:`~vlmkit.core.interfaces.Sample`. The :class:`SampleBuilder` collects its text as segments
(trained or not), keeps the media in ``<image>`` marker order, and records each in-context example
as a unit (a range of segments and images) that truncation may drop from the front. Adjacent
segments with the same trained flag are merged, never across a unit's edge. Segments only mark
character spans: the collator tokenises the sample's whole text at once and trains the tokens that
hold trained characters, so where segments join never changes the tokens.

Every template lays its text out so that dropping the first unit leaves exactly what the template
renders for the record without its first in-context example: separators and role headers that
the following example needs sit outside the unit (in the prefix) or at the end of the unit before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vlmkit.core.data.records import Exchange, Media, Record
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Sample

#: the marker the collator expands to the image's placeholder tokens (the templates' name for
#: :data:`vlmkit.core.interfaces.IMAGE_TOKEN`)
from vlmkit.core.interfaces import IMAGE_TOKEN as IMAGE  # noqa: E402,F401


def record_error(record: Any, message: str) -> VlmkitError:
    """A data error naming the record."""
    return VlmkitError(f"record '{getattr(record, 'id', '?')}': {message}")


def check_record(record: Any, template: str) -> None:
    """``record`` must be a :class:`Record` with a query exchange."""
    if not isinstance(record, Record):
        raise VlmkitError(
            f"template {template}: expected a vlmkit.core.data.records.Record, got {type(record).__name__}"
        )
    if not isinstance(record.query, Exchange):
        raise record_error(record, f"its query is a {type(record.query).__name__}, not an Exchange")


def pairs(record: Record, exchange: Exchange, where: str) -> list[tuple[str, str]]:
    """The (user, assistant) texts of an exchange, checked: turns alternate user/assistant from a
    user turn, end with an assistant turn, answers are not empty, and no text holds ``<image>``
    (media go in ``Exchange.media``; the template writes the markers)."""
    turns = list(exchange.turns)
    if not turns:
        raise record_error(record, f"{where} has no turns")
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise record_error(
                record,
                f"{where}, turn {i}: expected a {expected} turn, got '{turn.role}' "
                "(turns must alternate user/assistant, starting with the user)",
            )
        if not isinstance(turn.text, str):
            raise record_error(record, f"{where}, turn {i}: text is a {type(turn.text).__name__}, not a string")
        if IMAGE in turn.text:
            raise record_error(
                record,
                f"{where}, turn {i}: the text contains the marker '{IMAGE}'; media belong in Exchange.media "
                "and the template places their markers",
            )
        if expected == "assistant":
            if not turn.text.strip():
                raise record_error(record, f"{where}, turn {i}: empty answer")
            out.append((turns[i - 1].text, turn.text))
    if len(turns) % 2:
        raise record_error(record, f"{where} ends with a user turn; the last turn must be the assistant's answer")
    return out


def exchanges(record: Record) -> list[tuple[str, Exchange]]:
    """The in-context examples then the query, each with a name for error messages."""
    named = [(f"in-context example {k}", ex) for k, ex in enumerate(record.context)]
    named.append(("query", record.query))
    for where, ex in named:
        if not isinstance(ex, Exchange):
            raise record_error(record, f"{where} is a {type(ex).__name__}, not an Exchange")
    return named


def media_item(record: Record, media: Media) -> Any:
    """What ``Sample.images`` holds for one media: the PIL image of a single frame, the list of
    frames of a clip."""
    frames = list(media.frames)
    if not frames:
        raise record_error(record, f"media '{media.id}' has no frames")
    return frames[0] if len(frames) == 1 else frames


def shared_media(record: Record) -> list[Media]:
    """The media of a ``shared_media`` record (the query's). In-context examples may repeat them
    (same ids) or carry none; other media are an error."""
    ids = [m.id for m in record.query.media]
    for k, ex in enumerate(record.context):
        if ex.media and [m.id for m in ex.media] != ids:
            raise record_error(
                record,
                f"shared_media: in-context example {k} has media {[m.id for m in ex.media]}, "
                f"not the query's {ids}",
            )
    return list(record.query.media)


def eos_text(tokenizer: Any, template: str) -> str:
    """The tokenizer's end-of-sequence token as text (templates write it into trained segments)."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise VlmkitError(f"template {template}: the decoder's tokenizer has no eos_token to end answers with")
    return str(eos)


class SampleBuilder:
    """Collects segments, images and units of one sample."""

    def __init__(self, record: Record):
        self.record = record
        self.segments: list[tuple[str, bool]] = []
        self.images: list[Any] = []
        self.units: list[tuple[int, int, int, int]] = []
        self._sealed = 0  # segments before this index are never merged into
        self._in_unit = False

    def add(self, text: str, trained: bool = False) -> None:
        """Append text; ``<image>`` markers in it must come from :meth:`media`."""
        if not text:
            return
        if len(self.segments) > self._sealed and self.segments[-1][1] == trained:
            self.segments[-1] = (self.segments[-1][0] + text, trained)
        else:
            self.segments.append((text, trained))

    def media(self, media: list[Media], before: str = "", after: str = "") -> str:
        """Register ``media`` in order and return their markers, each between ``before`` and
        ``after``, for the caller to place (untrained) with :meth:`add`."""
        for m in media:
            self.images.append(media_item(self.record, m))
        return "".join(before + IMAGE + after for m in media)

    @contextmanager
    def unit(self) -> Iterator[None]:
        """Everything added inside is one droppable in-context example."""
        if self._in_unit:
            raise RuntimeError("units do not nest")
        self._in_unit = True
        self._sealed = len(self.segments)
        seg0, img0 = len(self.segments), len(self.images)
        try:
            yield
        finally:
            self._in_unit = False
        self._sealed = len(self.segments)
        self.units.append((seg0, len(self.segments), img0, len(self.images)))

    def build(self) -> Sample:
        return Sample(
            id=str(self.record.id),
            images=list(self.images),
            segments=list(self.segments),
            units=list(self.units),
        )
