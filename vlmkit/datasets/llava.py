"""LLaVA-style JSON data: conversations (``llava``), image captions (``captions``) and text-only
instruction pairs (``text_only``).

Every reader takes ``path`` (a JSON list or a JSONL file, one record per line; ``.jsonl`` /
``.ndjson`` files are read as JSONL), ``limit`` (the first N usable records) and ``on_error``.
Images are relative to ``image_folder`` (default: the folder of ``path``) and are opened lazily, as
RGB PIL images, when a record is read.

Bad records (a missing or unreadable image file, a decompression bomb included; an empty answer or
caption; a malformed conversation; text that is not valid Unicode, such as a lone surrogate spelled
``"\\ud800"``; an image path that is absolute or climbs out of ``image_folder`` with ``..``, unless
``allow_outside_image_folder: true``) are skipped by default (``on_error: skip``): problems visible in the JSON are found
when the file is loaded; an image that is missing or unreadable is found when its record is read,
and ``dataset[i]`` then returns the next good record (``i + 1``, ``i + 2`` ... wrapping around),
the same one on every call. :meth:`JsonRecords.error_report` lists the skipped records by
problem; :meth:`JsonRecords.summary` says it in one line (marks made by DataLoader workers are
shared with the parent process, as ``mimicit`` does). With
``on_error: fail`` the first bad record raises a :class:`~vlmkit.core.errors.VlmkitError` naming
the file and the record id.
"""

from __future__ import annotations

from abc import abstractmethod

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt

from vlmkit.core.data.build import current_where, field_name
from vlmkit.core.data.images import ImageDecodeError, read_image_file
from vlmkit.core.data.records import Exchange, Media, Record, Turn, printable, unencodable_text
from vlmkit.core.data.skips import BadRecord, SkippingReads, skip_summary
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import IMAGE_TOKEN, Dataset, DatasetConfig

__all__ = ["LlavaConversations", "Captions", "TextOnly", "JsonRecords", "PROBLEMS"]


#: the kinds of bad record, as :meth:`JsonRecords.error_report` names them. ``bad_text``: a string
#: that is not valid Unicode (a lone surrogate such as ``"\ud800"``, which JSON escapes can spell);
#: ``outside_image_folder``: an absolute image path, or one that climbs out of ``image_folder`` with
#: ``..`` (refused unless ``allow_outside_image_folder: true``)
PROBLEMS = ("missing_image", "unreadable_image", "empty_answer", "malformed", "bad_text", "outside_image_folder")

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# -------------------------------------------------------------------------------------------- configs
class TextDataConfig(DatasetConfig):
    path: Path = Field(description="a JSON list of records or a JSONL file (one record per line)")
    limit: PositiveInt | None = Field(None, description="use only the first N usable records")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="a bad record is skipped (counted in the summary) or stops with an error"
    )


class ImageDataConfig(TextDataConfig):
    image_folder: Path | None = Field(
        None, description="folder the records' image paths are relative to (default: the folder of `path`)"
    )
    allow_outside_image_folder: bool = Field(
        False, description="accept image paths that are absolute or climb out of image_folder with '..' "
                           "(default: such a record is bad: outside_image_folder)"
    )


class CaptionsConfig(ImageDataConfig):
    prompt: str = Field("", description="the user turn before each caption (empty: the image alone)")


# ---------------------------------------------------------------------------------------------- base
class JsonRecords(SkippingReads, Dataset):
    """Shared loading, validation and error policy of the JSON readers.

    A subclass implements :meth:`_parse` (one JSON entry -> a prepared item or :class:`BadRecord`) and
    :meth:`_record` (a prepared item -> :class:`Record`, loading its images)."""

    #: the dataset type, for messages
    type_name: ClassVar[str] = "json"

    def __init__(self, config: TextDataConfig):
        super().__init__(config)
        self.path = Path(config.path).expanduser()
        if not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "does not exist"
            raise VlmkitError(f"{field_name('path', self.type_name)}: {str(self.path)!r} {what}{_where(self.path)}")
        folder = getattr(config, "image_folder", None)
        self.image_folder = Path(folder).expanduser() if folder is not None else self.path.parent
        if folder is not None and not self.image_folder.is_dir():
            what = "is a file, not a folder" if self.image_folder.exists() else "does not exist"
            raise VlmkitError(f"{field_name('image_folder', self.type_name)}: {str(self.image_folder)!r} {what}"
                              f"{_where(self.image_folder)}")
        self._allow_outside = bool(getattr(config, "allow_outside_image_folder", False))
        self._where = current_where()  # data.<alias> inside a run: names the option in messages
        self._fail = config.on_error == "fail"
        self._skipped: dict[str, list[str]] = {}  # kind -> ids dropped when loading
        self._items: list[tuple[str, Any]] = []  # (record id, prepared item)
        limit = config.limit
        for position, entry in self._entries():
            rid = self._entry_id(entry, position)
            try:
                if isinstance(entry, BadRecord):
                    raise entry
                if not isinstance(entry, dict):
                    raise BadRecord("malformed", f"expected a JSON object, got {type(entry).__name__}")
                bad_text = unencodable_text(entry)
                if bad_text:
                    raise BadRecord("bad_text", bad_text)
                item = self._parse(entry)
            except BadRecord as bad:
                self._problem(bad, rid)
                continue
            self._items.append((rid, item))
            if limit is not None and len(self._items) >= limit:
                break
        if not self._items:
            raise VlmkitError(f"{self.path}: no usable {self.type_name} records; {self.summary() or 'it is empty'}")
        # records whose image is missing or unreadable, marked by __getitem__ with 1 + the index
        # of the problem in PROBLEMS; shared memory, so DataLoader workers' marks reach the parent
        self._init_marks(len(self._items))

    # ---------------------------------------------------------------------------------------- reading
    def _entries(self) -> Iterator[tuple[int, Any]]:
        """``(position, entry)`` for each record of the file; a JSONL line that does not parse is
        a :class:`BadRecord` entry."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise VlmkitError(f"{self.path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
        except OSError as exc:
            raise VlmkitError(f"{self.path}: cannot read it ({exc.strerror or exc})") from None
        if self.path.suffix.lower() not in (".jsonl", ".ndjson"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                if not text.lstrip().startswith("{"):
                    raise VlmkitError(f"{self.path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
                data = None  # objects one per line: read it as JSONL
            if data is not None:
                if not isinstance(data, list):
                    raise VlmkitError(f"{self.path}: expected a JSON list of records (or JSONL), got a "
                                      f"{type(data).__name__}")
                yield from enumerate(data)
                return
        position = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                entry = BadRecord("malformed", f"line {lineno} is not valid JSON ({exc.msg})")
            yield position, entry
            position += 1

    def _entry_id(self, entry: Any, position: int) -> str:
        if isinstance(entry, dict) and entry.get("id") not in (None, ""):
            return printable(str(entry["id"]))
        return f"#{position}"

    @abstractmethod
    def _parse(self, entry: dict[str, Any]) -> Any:
        """One file entry -> the item kept for it (raises ``BadRecord`` for a bad record)."""

    @abstractmethod
    def _record(self, rid: str, item: Any) -> Record:
        """A kept item -> its record, images read now (raises ``BadRecord`` for a missing image)."""

    def _image_path(self, entry: dict[str, Any], key: str = "image", required: bool = True) -> str | None:
        """The entry's image path (relative to ``image_folder``): an absolute one, or one that
        climbs out of the folder with ``..``, is an ``outside_image_folder`` record unless the
        config's ``allow_outside_image_folder`` is set."""
        value = _image_path(entry, key, required)
        if value is None or self._allow_outside:
            return value
        if Path(value).is_absolute() or os.path.isabs(value) or value.startswith("~"):
            how = "is absolute"
        elif os.path.normpath(value).replace("\\", "/").split("/")[0] == "..":
            how = "climbs out of the image folder with '..'"
        else:
            return value
        option = f"{self._where}.allow_outside_image_folder" if self._where else "allow_outside_image_folder"
        raise BadRecord("outside_image_folder", f"'{key}' path {value!r} {how}; image paths are read relative to "
                                           f"{self.image_folder} and must stay inside it (set {option}: true to "
                                           "allow paths outside it)")

    def _load_image(self, relative: str) -> Any:
        path = self.image_folder / relative
        if not path.is_file():
            raise BadRecord("missing_image", f"image file not found: {path}")
        try:
            return read_image_file(path)
        except (OSError, ImageDecodeError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise BadRecord("unreadable_image", f"image file {path} is not a readable image ({reason})") from None

    # --------------------------------------------------------------------------------- error policy
    def _problem(self, bad: BadRecord, rid: str) -> None:
        if self._fail:
            raise VlmkitError(f"{self.path}: record {rid}: {bad.message} ({self.type_name} on_error: fail; "
                              "'skip' drops such records)")
        self._skipped.setdefault(bad.kind, []).append(rid)

    def error_report(self) -> dict[str, list[str]]:
        """Kind of problem (:data:`PROBLEMS` order) -> ids of the records skipped for it: those
        dropped when the file was loaded and those whose image was found missing or unreadable so
        far (by this process or its DataLoader workers)."""
        report = {kind: list(ids) for kind, ids in self._skipped.items()}
        for j in range(len(self._items)):
            if self._bad[j]:
                report.setdefault(PROBLEMS[self._bad[j] - 1], []).append(self._items[j][0])
        return {kind: report[kind] for kind in PROBLEMS if kind in report}

    def summary(self, max_ids: int = 5) -> str:
        """One line: ``"captions captions.json: skipped 2 records (missing_image 1, empty_answer
        1): first ids a, b"``; ``""`` when nothing was skipped."""
        return skip_summary(f"{self.type_name} {self.path.name}", self.error_report(), max_ids)

    # -------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Record:
        def build(j: int) -> Record:
            return self._record(*self._items[j])

        def mark(j: int, bad: BaseException) -> int:
            if self._fail:
                self._problem(bad, self._items[j][0])  # raises
            return PROBLEMS.index(bad.kind) + 1

        record = self._first_good(index, build, (BadRecord,), mark)
        if record is None:
            raise VlmkitError(f"{self.path}: no {self.type_name} record has a readable image; {self.summary()}")
        return record

    def ids(self) -> list[str]:
        """The ids of the usable records, in order."""
        return [rid for rid, _ in self._items]


def _where(path: Path) -> str:
    return f" (relative to the working directory {os.getcwd()})" if not path.is_absolute() else ""


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        raise BadRecord("malformed", f"'{key}' must be a string, got {'nothing' if value is None else type(value).__name__}")
    return value


def _image_path(entry: dict[str, Any], key: str = "image", required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("malformed", f"'{key}' must be an image path")
    return value


def _references(entry: dict[str, Any], key: str) -> list[str]:
    """An optional list of reference texts (``answers``, ``captions``): absent -> ``[]``."""
    value = entry.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise BadRecord("malformed", f"'{key}' must be a non-empty list of non-empty strings")
    return list(value)


# ------------------------------------------------------------------------------------------- readers
class LlavaConversations(JsonRecords):
    """LLaVA conversation JSON: ``[{id, image?, conversations: [{from: human|gpt, value}, ...]}]``.

    Turns must alternate human/gpt, starting with human and ending with gpt; every gpt answer must
    be non-empty. The ``<image>`` marker of the first human turn (and the whitespace around it) is
    removed: the template places the markers, and the image becomes the query's media. A record
    without ``image`` is text-only (a marker there, or a marker after the first human turn, makes
    the record malformed). An optional ``answers`` list holds every acceptable answer to the last
    question (e.g. VQA's 10 human answers), kept as the query's ``references`` for evaluations."""

    Config = ImageDataConfig
    type_name = "llava"

    def _parse(self, entry: dict[str, Any]) -> Any:
        image = self._image_path(entry, required=False)
        conversation = entry.get("conversations")
        if not isinstance(conversation, list) or not conversation:
            raise BadRecord("malformed", "'conversations' must be a non-empty list of {from, value} turns")
        turns: list[tuple[str, str]] = []
        for k, turn in enumerate(conversation):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise BadRecord("malformed", f"turn {k} must be {{from: human|gpt, value: text}}")
            role = _ROLES.get(str(turn.get("from", "")).lower())
            expected = "user" if k % 2 == 0 else "assistant"
            if role != expected:
                raise BadRecord("malformed", f"turn {k} is from '{turn.get('from')}', expected "
                                        f"'{'human' if expected == 'user' else 'gpt'}' (turns alternate "
                                        "human/gpt, starting with human)")
            turns.append((role, turn["value"]))
        if len(turns) % 2:
            raise BadRecord("malformed", "the conversation ends with a human turn that has no gpt answer")
        for k, (role, text) in enumerate(turns):
            if role == "assistant" and not text.strip():
                raise BadRecord("empty_answer", f"turn {k} (gpt) is empty")
            if IMAGE_TOKEN in text and (k != 0 or image is None):
                where = "a record without image" if image is None else f"turn {k}"
                raise BadRecord("malformed", f"{IMAGE_TOKEN} marker in {where}")
        first = turns[0][1]
        if first.count(IMAGE_TOKEN) > 1:
            raise BadRecord("malformed", f"more than one {IMAGE_TOKEN} marker in the first human turn")
        if IMAGE_TOKEN in first:
            before, after = first.split(IMAGE_TOKEN)
            before, after = before.strip(), after.strip()
            first = f"{before}\n{after}" if before and after else before or after
            turns[0] = ("user", first)
        return image, turns, _references(entry, "answers")

    def _record(self, rid: str, item: Any) -> Record:
        image, turns, references = item
        media = [Media(id=image, frames=[self._load_image(image)])] if image is not None else []
        exchange = Exchange(turns=[Turn(role, text) for role, text in turns], media=media, id=rid,
                            references=references)
        return Record(id=rid, query=exchange)


class Captions(JsonRecords):
    """(image, caption) pairs, ``[{image, caption, id?}]`` (JSON list or JSONL): CAPTION records
    whose user turn is ``prompt`` (default empty) and whose answer is the caption. An entry may give
    ``captions: [...]`` (every reference caption of the image, as COCO has 5) instead of
    ``caption``: the first is the record's answer, all are its query's ``references``."""

    Config = CaptionsConfig
    type_name = "captions"

    def _entry_id(self, entry: Any, position: int) -> str:
        if isinstance(entry, dict) and entry.get("id") in (None, "") and isinstance(entry.get("image"), str):
            return entry["image"]
        return super()._entry_id(entry, position)

    def _parse(self, entry: dict[str, Any]) -> Any:
        image = self._image_path(entry)
        if "captions" in entry:
            if "caption" in entry:
                raise BadRecord("malformed", "give 'caption' or 'captions', not both")
            references = _references(entry, "captions")
            return image, references[0], references
        caption = _text(entry, "caption")
        if not caption.strip():
            raise BadRecord("empty_answer", "the caption is empty")
        return image, caption, []

    def _record(self, rid: str, item: Any) -> Record:
        image, caption, references = item
        media = [Media(id=image, frames=[self._load_image(image)])]
        turns = [Turn("user", self.config.prompt), Turn("assistant", caption)]
        exchange = Exchange(turns=turns, media=media, id=rid, references=references)
        return Record(id=rid, query=exchange)


class TextOnly(JsonRecords):
    """(instruction, answer) pairs, ``[{instruction, answer, id?}]`` (JSON list or JSONL):
    TEXT_ONLY records without media."""

    Config = TextDataConfig
    type_name = "text_only"

    def _parse(self, entry: dict[str, Any]) -> Any:
        instruction = _text(entry, "instruction")
        answer = _text(entry, "answer")
        if not answer.strip():
            raise BadRecord("empty_answer", "the answer is empty")
        if IMAGE_TOKEN in instruction or IMAGE_TOKEN in answer:
            raise BadRecord("malformed", f"{IMAGE_TOKEN} marker in a text-only record")
        return instruction, answer

    def _record(self, rid: str, item: Any) -> Record:
        instruction, answer = item
        turns = [Turn("user", instruction), Turn("assistant", answer)]
        return Record(id=rid, query=Exchange(turns=turns, id=rid))
