"""Visual annotations, the pipeline's input: one JSON object per line,
``{"id", "media": [paths], "captions": [str], "boxes": [[label, x0, y0, x1, y1]], "timestamps"?: [seconds]}``.

``media`` paths are relative to the annotations file's folder (or absolute); several media are the
images of one item (a pair to compare, or a clip's frames in time order, ``timestamps`` giving each
frame's time). The LLM never sees the pixels: only captions, boxes and times."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlmkit.core.errors import VlmkitError

__all__ = ["Annotation", "BadAnnotation", "read_annotations", "pydantic_problems"]


class Annotation(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    """Unique in the file; letters, digits, '_', '-', '.' (it becomes part of image ids)."""
    media: list[str] = Field(min_length=1)
    captions: list[str] = []
    boxes: list[tuple[str, float, float, float, float]] = []
    """``[label, x0, y0, x1, y1]`` in pixels of the (first) image."""
    timestamps: list[float] | None = None
    """Seconds of each media item (a clip's frames), as many as ``media``."""

    @model_validator(mode="after")
    def _check(self) -> "Annotation":
        if self.timestamps is not None and len(self.timestamps) != len(self.media):
            raise ValueError(f"timestamps: {len(self.timestamps)} given for {len(self.media)} media")
        if not self.captions and not self.boxes:
            raise ValueError("has neither captions nor boxes: nothing for the LLM to read")
        for box in self.boxes:
            if box[3] < box[1] or box[4] < box[2]:
                raise ValueError(f"box {list(box)}: x1 must be >= x0 and y1 >= y0")
        return self

    def labels(self) -> list[str]:
        return [box[0] for box in self.boxes]


@dataclass(frozen=True)
class BadAnnotation:
    """A line that is not a valid annotation, or whose media are missing."""

    where: str      # "file:line"
    item_id: str | None
    reason: str     # "bad_annotation" | "missing_media"
    problem: str


def pydantic_problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())


def read_annotations(path: Path, check_media: bool = True) -> tuple[list[tuple[Annotation, list[Path]]], list[BadAnnotation]]:
    """The good annotations (each with its resolved media paths) and the bad lines, in file order.
    Blank lines are skipped; a repeated id is an error (ids name the outputs)."""
    path = Path(path)
    if not path.is_file():
        raise VlmkitError(f"--annotations: '{path}' is not a file")
    good: list[tuple[Annotation, list[Path]]] = []
    bad: list[BadAnnotation] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:   # decoded line by line: one line that is not UTF-8 is a reject, not a crash
        for number, data in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")   # a leading BOM is fine
            except UnicodeDecodeError as exc:
                bad.append(BadAnnotation(where, None, "bad_annotation", f"not UTF-8 text: byte {exc.start + 1}"))
                continue
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(BadAnnotation(where, None, "bad_annotation", f"not JSON: {exc.msg} at column {exc.colno}"))
                continue
            item_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            try:
                ann = Annotation.model_validate(raw)
            except ValidationError as exc:
                bad.append(BadAnnotation(where, item_id, "bad_annotation", pydantic_problems(exc)))
                continue
            if ann.id in seen:
                raise VlmkitError(f"{where}: id '{ann.id}' repeats line {seen[ann.id]}; ids must be unique")
            seen[ann.id] = number
            media = [(Path(m) if Path(m).is_absolute() else path.parent / m) for m in ann.media]
            missing = [str(m) for m in media if check_media and not m.is_file()]
            if missing:
                bad.append(BadAnnotation(where, ann.id, "missing_media", f"media not found: {', '.join(missing)}"))
                continue
            good.append((ann, media))
    return good, bad
