"""``mimicit``: MIMIC-IT instructions with their images and in-context examples (REFERENCE 1.6).

On disk: ``XX_instructions.json`` (``{"meta": ..., "data": {id: {"instruction", "answer",
"image_ids", "rel_ins_ids"}}}``), the images as ``XX.parquet`` (a ``base64`` column indexed by image
id) or legacy ``XX.json`` (``{image id: base64}``), and optionally ``XX_train.json`` (``{id: [in-context
ids]}``: the training instructions and their examples; without it every instruction is a query and
its examples are its ``rel_ins_ids``).

Each item is a :class:`~vlmkit.core.data.records.Record`: the query ``Exchange`` (user instruction,
assistant answer, media) and its in-context examples (every listed one, or the last
``max_context``). With ``context_mode: same_media`` the examples are other instructions about the
query's own image or clip: the media are on the query and ``Record.shared_media`` is set (one
leading image); with ``per_example`` every example carries its own media. A video clip
(``VIDEO_TEXT``) is one :class:`Media` whose frames are ``num_frames`` of the record's frame ids,
resampled evenly as Otter does. A still record with several images (spot-the-difference pairs)
gives one media per image, or with ``images_as: frames`` one media whose frames are its images
(Otter's SD layout: one ``<image>``).

The record list and the image ids are indexed at construction; no image is decoded until
``__getitem__``. Bad records (``on_error``):

- found at construction (unknown id, malformed entry, empty answer, unknown in-context id, missing
  image id): ``skip`` drops them, ``fail`` raises;
- found when decoding (image data that is not an image): ``skip`` returns the next good record
  (the following index, wrapping), ``fail`` raises.

:meth:`MimicIT.error_report` and :meth:`MimicIT.summary` tell what was skipped; the marks of
records found bad while decoding are shared with DataLoader workers (shared memory), so the parent
process's report includes what its workers skipped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import NonNegativeInt, PositiveInt, model_validator

from vlmkit.core.data.images import ImageStoreError, JsonImages, ParquetImages, open_image_store
from vlmkit.core.data.build import field_name
from vlmkit.core.data.records import Exchange, Media, Record, Turn, unencodable_text
from vlmkit.core.data.skips import BadRecord, SkippingReads, skip_summary
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Dataset, DatasetConfig

__all__ = ["MimicIT", "MimicITConfig", "resample_frames", "ERROR_KINDS"]

#: the kinds of bad record, in the order reports list them
ERROR_KINDS = ("unknown_id", "malformed", "empty_answer", "unknown_context_id", "missing_image_id", "bad_image",
               "bad_text")
_FRAME_SUFFIX = re.compile(r"_\d+$")


class MimicITConfig(DatasetConfig):
    instructions: Path
    """``XX_instructions.json`` (absolute, or relative to the working directory)."""
    images: Path | None = None
    """``XX.parquet`` or legacy ``XX.json``; not needed for ``TEXT_ONLY``."""
    train_config: Path | None = None
    """``XX_train.json`` (query id -> in-context ids); without it: every instruction, with its
    ``rel_ins_ids``."""
    group: Literal["IMAGE_TEXT", "TEXT_ONLY", "VIDEO_TEXT", "IMAGE_TEXT_IN_CONTEXT"]
    """The data group, always given (never inferred from file names)."""
    max_context: NonNegativeInt | None = None
    """At most this many in-context examples per query: the last ones of its list. Default (none):
    every listed id, as Otter trains (its lists hold 3-8); a sample longer than the stage's
    ``max_length`` still loses whole examples, oldest first, when it is collated. 0: none."""
    context_mode: Literal["same_media", "per_example"] | None = None
    """``same_media``: the examples share the query's media (one leading image); ``per_example``:
    each example has its own. Default: ``per_example`` for IMAGE_TEXT_IN_CONTEXT, else
    ``same_media``."""
    num_frames: PositiveInt = 8
    """VIDEO_TEXT: frames per clip, resampled evenly from the record's frame ids."""
    images_as: Literal["media", "frames"] | None = None
    """How the ``image_ids`` of one record enter the model. ``media``: one media per image, each
    with its own ``<image>``; ``frames``: all of them, in order, as the frames of ONE media (the F
    axis of ``vision_x``) with one ``<image>``, as Otter feeds spot-the-difference (SD) pairs, so
    that the text attends to both images even with ``only_attend_immediate_media``. Default:
    ``frames`` for VIDEO_TEXT (the only choice there: clips are resampled to ``num_frames``),
    ``media`` for the other groups. A batch holds media of one frame count: with ``frames`` every
    record of the dataset should list the same number of images."""
    on_error: Literal["skip", "fail"] = "skip"
    """Bad records: ``skip`` (count them, see ``summary()``) or ``fail`` (stop with an error)."""
    limit: PositiveInt | None = None
    """Keep only the first ``limit`` good records."""

    @model_validator(mode="after")
    def _video_is_frames(self) -> "MimicITConfig":
        if self.group == "VIDEO_TEXT" and self.images_as == "media":
            raise ValueError(
                "images_as: 'media' is not available for group VIDEO_TEXT: a clip's frame ids are always the "
                "frames of one media (resampled to num_frames); use 'frames' or leave images_as unset"
            )
        return self


class _Entry(NamedTuple):
    instruction: str
    answer: str
    image_ids: tuple[str, ...]
    rel_ins_ids: tuple[str, ...]


class _Malformed(NamedTuple):
    reason: str
    kind: str = "malformed"


def _compact(record: dict, force: bool = False) -> Any:
    """A parsed instruction record -> :class:`_Entry` (or :class:`_Malformed`); other objects
    (``meta``, ``data``) unchanged. The ``object_hook`` of the instructions file."""
    if not force and "instruction" not in record:
        return record
    instruction, answer = record.get("instruction"), record.get("answer", "")
    image_ids, rel = _ids(record.get("image_ids")), _ids(record.get("rel_ins_ids"))
    if not isinstance(instruction, str):
        return _Malformed("has no 'instruction' text")
    if answer is not None and not isinstance(answer, str):
        return _Malformed("has an 'answer' that is not text")
    if image_ids is None:
        return _Malformed("has 'image_ids' that are not a list of ids")
    if rel is None:
        return _Malformed("has 'rel_ins_ids' that are not a list of ids")
    bad_text = unencodable_text({"instruction": instruction, "answer": answer or ""})
    if bad_text:
        return _Malformed(bad_text, "bad_text")
    return _Entry(instruction.strip(), (answer or "").strip(), image_ids, rel)


def resample_frames(frame_ids: list[str] | tuple[str, ...], num_frames: int) -> list[str]:
    """``num_frames`` of ``frame_ids`` spread evenly, first and last included, as Otter does
    (``np.linspace(0, n - 1, num_frames).astype(int)``): 8 frames -> 4 gives frames 0, 2, 4, 7.
    Fewer frames than ``num_frames`` are repeated in the same way."""
    n = len(frame_ids)
    if n == 0:
        raise ValueError("no frames")
    if num_frames == 1:
        return [frame_ids[0]]
    return [frame_ids[i * (n - 1) // (num_frames - 1)] for i in range(num_frames)]


def _clip_id(frame_ids: tuple[str, ...]) -> str:
    stem = _FRAME_SUFFIX.sub("", frame_ids[0])
    return stem or frame_ids[0]


def _existing(path: Path, field: str) -> Path:
    if path.is_file():
        return path
    where = f" (relative to the working directory {os.getcwd()})" if not path.is_absolute() else ""
    what = "is a directory, not a file" if path.is_dir() else "does not exist"
    raise VlmkitError(f"{field_name(field, 'mimicit')}: {str(path)!r} {what}{where}")


def _read_json(path: Path, field: str, object_hook: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file, object_hook=object_hook)
    except json.JSONDecodeError as error:
        raise VlmkitError(f"mimicit {field}: {path} is not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise VlmkitError(f"mimicit {field}: cannot read {path} ({error})") from None


def _ids(value: Any) -> tuple[str, ...] | None:
    """A list of ids as a tuple of str, or None when it is not one."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
        return tuple(str(v) for v in value)
    return None


class MimicIT(SkippingReads, Dataset):
    """MIMIC-IT on disk (instructions JSON, JSON or parquet images, train config) with in-context
    examples; yields :class:`Record` s."""

    Config = MimicITConfig

    def __init__(self, config: MimicITConfig):
        super().__init__(config)
        c = config
        self.group = c.group
        self.context_mode = c.context_mode or ("per_example" if c.group == "IMAGE_TEXT_IN_CONTEXT" else "same_media")
        self.images_as = c.images_as or ("frames" if c.group == "VIDEO_TEXT" else "media")
        self.uses_media = c.group != "TEXT_ONLY"
        self.fail = c.on_error == "fail"
        self.instructions_path = _existing(Path(c.instructions), "instructions")
        self.train_path = _existing(Path(c.train_config), "train_config") if c.train_config is not None else None
        self.images: ParquetImages | JsonImages | None = None
        self.images_path: Path | None = None
        if self.uses_media:
            if c.images is None:
                raise VlmkitError(f"mimicit images: group {c.group} needs the image file (XX.parquet or XX.json)")
            self.images_path = _existing(Path(c.images), "images")
            try:
                self.images = open_image_store(self.images_path)
            except ImageStoreError as error:
                raise VlmkitError(f"mimicit images: {error}") from None

        self._entries: dict[str, _Entry] = {}
        self._malformed: dict[str, _Malformed] = {}  # id -> what is wrong with it
        order = self._load_instructions()
        queries = self._queries(order)

        self._skipped: dict[str, list[str]] = {}
        self._items: list[tuple[str, tuple[str, ...]]] = []
        for rid, context, source in queries:
            if c.limit is not None and len(self._items) >= c.limit:
                break
            try:
                self._items.append((rid, self._check(rid, context, source)))
            except BadRecord as bad:
                if self.fail:
                    raise VlmkitError(f"{bad.message} (mimicit on_error: fail; 'skip' drops such records)") from None
                self._skipped.setdefault(bad.kind, []).append(rid)
        if not self._items:
            raise VlmkitError(f"mimicit: {self.instructions_path} has no usable records; {self.summary() or 'it is empty'}")
        # records whose images fail to decode, marked in __getitem__; shared memory, so the marks of
        # DataLoader workers reach the parent's error_report()
        self._init_marks(len(self._items))

    # ---------------------------------------------------------------------------------- indexing
    def _load_instructions(self) -> list[str]:
        """Index every instruction compactly; their ids in file order. Records become small tuples
        while the file is parsed, so the parsed JSON never exists whole."""
        raw = _read_json(self.instructions_path, "instructions", object_hook=_compact)
        data = raw.get("data") if isinstance(raw, dict) else None
        if not isinstance(data, dict):
            raise VlmkitError(
                f"mimicit instructions: {self.instructions_path} is not a MIMIC-IT instructions file "
                '(expected {"meta": {...}, "data": {instruction id: {"instruction", "answer", "image_ids", "rel_ins_ids"}}})'
            )
        for rid, record in data.items():
            rid = str(rid)
            if isinstance(record, dict):  # without an 'instruction' key: left as parsed
                record = _compact(record, force=True)
            if isinstance(record, _Entry):
                self._entries[rid] = record
            elif isinstance(record, _Malformed):
                self._malformed[rid] = record
            else:
                self._malformed[rid] = _Malformed(f"is a {type(record).__name__}, not an object")
        return [str(rid) for rid in data]

    def _queries(self, order: list[str]) -> list[tuple[str, Any, Path]]:
        """(query id, its in-context ids as found, the file they come from)."""
        if self.train_path is None:
            out: list[tuple[str, Any, Path]] = []
            for rid in order:
                entry = self._entries.get(rid)
                out.append((rid, entry.rel_ins_ids if entry else (), self.instructions_path))
            return out
        train = _read_json(self.train_path, "train_config")
        if not isinstance(train, dict):
            raise VlmkitError(f"mimicit train_config: {self.train_path} must map instruction ids to lists of in-context ids")
        return [(str(rid), context, self.train_path) for rid, context in train.items()]

    def _check(self, rid: str, context: Any, source: Path) -> tuple[str, ...]:
        """The query's kept in-context ids, or :class:`BadRecord` with the first problem found."""
        where = f"{self.instructions_path}: record {rid!r}"
        if rid in self._malformed:
            bad = self._malformed[rid]
            raise BadRecord(bad.kind, f"{where}: {bad.reason}" if bad.kind == "bad_text" else f"{where} {bad.reason}")
        entry = self._entries.get(rid)
        if entry is None:
            raise BadRecord("unknown_id", f"{source}: record {rid!r} is not in {self.instructions_path}")
        ids = _ids(context)
        if ids is None:
            raise BadRecord("malformed", f"{source}: record {rid!r}: the in-context ids are not a list of ids")
        if not entry.answer:
            raise BadRecord("empty_answer", f"{where} has an empty answer")
        cap = self.config.max_context
        kept = ids if cap is None or cap >= len(ids) else ids[len(ids) - cap :]  # cap 0: ()
        for cid in kept:
            if cid in self._malformed:
                bad = self._malformed[cid]
                sep = ": " if bad.kind == "bad_text" else " "
                raise BadRecord(bad.kind, f"{where}: in-context example {cid!r}{sep}{bad.reason}")
            example = self._entries.get(cid)
            if example is None:
                raise BadRecord("unknown_context_id", f"{source}: record {rid!r}: in-context id {cid!r} is not in {self.instructions_path}")
            if not example.answer:
                raise BadRecord("empty_answer", f"{where}: in-context example {cid!r} has an empty answer")
        if self.uses_media:
            self._check_media(rid, rid, entry)
            if self.context_mode == "per_example":
                for cid in kept:
                    self._check_media(rid, cid, self._entries[cid])
        return kept

    def _check_media(self, rid: str, owner: str, entry: _Entry) -> None:
        about = f"record {rid!r}" if owner == rid else f"record {rid!r}: in-context example {owner!r}"
        if not entry.image_ids:
            raise BadRecord("missing_image_id", f"{self.instructions_path}: {about} has no image_ids (group {self.group})")
        assert self.images is not None
        for image_id in entry.image_ids:
            if image_id not in self.images:
                raise BadRecord("missing_image_id", f"{self.instructions_path}: {about}: image id {image_id!r} is not in {self.images_path}")

    # ----------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Record:
        def mark(j: int, error: BaseException) -> int:
            if self.fail:
                raise VlmkitError(f"{error} (record {self._items[j][0]!r}; mimicit on_error: fail)") from None
            return 1

        record = self._first_good(index, self._build, (ImageStoreError,), mark)
        if record is None:
            raise VlmkitError(f"mimicit: no image of {self.images_path} decodes; {self.summary()}")
        return record

    def _build(self, j: int) -> Record:
        rid, context_ids = self._items[j]
        entry = self._entries[rid]
        cache: dict[str, Any] = {}
        context = []
        per_example = self.uses_media and self.context_mode == "per_example"
        for cid in context_ids:
            example = self._entries[cid]
            media = self._media(example.image_ids, cache) if per_example else []
            context.append(_exchange(cid, example, media))
        query = _exchange(rid, entry, self._media(entry.image_ids, cache) if self.uses_media else [])
        shared = self.uses_media and self.context_mode == "same_media" and bool(context)
        return Record(id=rid, query=query, context=context, shared_media=shared)

    def _media(self, image_ids: tuple[str, ...], cache: dict[str, Any]) -> list[Media]:
        def image(image_id: str) -> Any:
            if image_id not in cache:
                cache[image_id] = self.images.get(image_id)  # type: ignore[union-attr]
            return cache[image_id]

        if self.group == "VIDEO_TEXT":
            frames = resample_frames(image_ids, self.config.num_frames)
            return [Media(id=_clip_id(image_ids), frames=[image(f) for f in frames])]
        if self.images_as == "frames" and image_ids:
            return [Media(id="+".join(image_ids), frames=[image(i) for i in image_ids])]
        return [Media(id=i, frames=[image(i)]) for i in image_ids]

    # ---------------------------------------------------------------------------------- reports
    def error_report(self) -> dict[str, list[str]]:
        """Kind of problem -> ids of the records skipped for it (kinds in :data:`ERROR_KINDS`
        order), those dropped at construction and those found undecodable so far."""
        report = {kind: list(ids) for kind, ids in self._skipped.items()}
        bad = [self._items[j][0] for j in range(len(self._items)) if self._bad[j]]
        if bad:
            report["bad_image"] = report.get("bad_image", []) + bad
        return {kind: report[kind] for kind in ERROR_KINDS if kind in report}

    def summary(self, max_ids: int = 5) -> str:
        """One line for the end of an epoch: ``"mimicit X_instructions.json: skipped N records
        (kind n, ...): first ids a, b, ..."``; ``""`` when nothing was skipped."""
        return skip_summary(f"mimicit {self.instructions_path.name}", self.error_report(), max_ids)

    # ---------------------------------------------------------------------------------- pickling


def _exchange(rid: str, entry: _Entry, media: list[Media]) -> Exchange:
    return Exchange(turns=[Turn("user", entry.instruction), Turn("assistant", entry.answer)], media=media, id=rid)
