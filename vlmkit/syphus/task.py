"""A generation task as a YAML file: who the LLM is (``system``), how an item's annotations are shown
(``prompt``, with the placeholders below), a few hand-written in-context examples (annotations and
the answer wanted for them), and how answers are parsed (``output``).

Placeholders of ``prompt`` (rendered by :func:`render_annotation`):
``{captions}`` (one per line), ``{objects}`` (``label [x0, y0, x1, y1]`` per box), ``{timeline}``
(``t=0s: media 1`` per timestamped media, else "none"), ``{media_count}``.

Shipped tasks live in ``vlmkit/syphus/tasks/``; a path to any YAML file works the same way."""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmkit.core.errors import VlmkitError, listing, suggest
from vlmkit.syphus.annotations import Annotation, pydantic_problems
from vlmkit.syphus.parse import OutputFormat, ParseError, parse_answer

__all__ = ["Task", "Example", "load_task", "shipped_tasks", "render_annotation", "PLACEHOLDERS"]

PLACEHOLDERS = ("captions", "objects", "timeline", "media_count")


class Example(BaseModel):
    """A hand-written in-context example: annotations and the answer the task wants for them."""

    model_config = ConfigDict(extra="forbid")

    annotation: dict[str, Any]
    """Like an annotation line (``media`` may be omitted: the LLM never sees it)."""
    answer: str = Field(min_length=1)


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str
    prefix: str = Field(pattern=r"^[A-Z][A-Z0-9]*$")
    """Names the output files (``<prefix>_instructions.json``, ...) and ids (``<prefix>_INS_00001``)."""
    group: Literal["IMAGE_TEXT", "VIDEO_TEXT"]
    """The MIMIC-IT data group the output is read as."""
    media: Literal["one", "several"]
    """``one``: items with exactly one image; ``several``: two or more (a pair, a clip's frames)."""
    system: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    examples: list[Example] = Field(min_length=1)
    output: OutputFormat

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        for _, field, _, _ in string.Formatter().parse(value):
            if field is not None and field not in PLACEHOLDERS:
                raise ValueError(f"unknown placeholder '{{{field}}}'{suggest(field, PLACEHOLDERS)} allowed: "
                                 + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
        return value

    @model_validator(mode="after")
    def _examples_parse(self) -> "Task":
        for i, example in enumerate(self.examples):
            try:
                Annotation.model_validate({"id": f"example{i}", "media": ["-"], **example.annotation})
                parse_answer(example.answer, self.output, f"example{i}")
            except ValidationError as exc:
                raise ValueError(f"examples.{i}.annotation: {pydantic_problems(exc)}") from None
            except ParseError as exc:
                raise ValueError(f"examples.{i}.answer does not parse with this task's output format: {exc}") from None
        return self

    def example_annotations(self) -> list[tuple[Annotation, str]]:
        return [(Annotation.model_validate({"id": f"example{i}", "media": ["-"], **e.annotation}), e.answer)
                for i, e in enumerate(self.examples)]

    def accepts(self, ann: Annotation) -> str | None:
        """Why this item does not fit the task (None: it fits)."""
        n = len(ann.media)
        if self.media == "one" and n != 1:
            return f"task {self.name} takes items with one image; '{ann.id}' has {n} media"
        if self.media == "several" and n < 2:
            return f"task {self.name} takes items with two or more media; '{ann.id}' has {n}"
        return None

    def messages(self, ann: Annotation) -> list[dict[str, str]]:
        """The chat prompt: system message, then each in-context example as a user turn (its
        annotations) and an assistant turn (its answer), then the item's annotations."""
        out = [{"role": "system", "content": self.system.strip()}]
        for example, answer in self.example_annotations():
            out.append({"role": "user", "content": self.prompt.format(**render_annotation(example)).strip()})
            out.append({"role": "assistant", "content": answer.strip()})
        out.append({"role": "user", "content": self.prompt.format(**render_annotation(ann)).strip()})
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def render_annotation(ann: Annotation) -> dict[str, str]:
    """The placeholder values of a prompt for ``ann``."""
    captions = "\n".join(f"- {c}" for c in ann.captions) or "none"
    objects = "\n".join(f"- {b[0]} [{', '.join(_num(v) for v in b[1:])}]" for b in ann.boxes) or "none"
    if ann.timestamps is not None:
        timeline = "\n".join(f"- t={_num(t)}s: media {i + 1}" for i, t in enumerate(ann.timestamps))
    else:
        timeline = "none"
    return {"captions": captions, "objects": objects, "timeline": timeline, "media_count": str(len(ann.media))}


def shipped_tasks() -> dict[str, Path]:
    folder = resources.files("vlmkit.syphus").joinpath("tasks")
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


#: the fields allowed at each level of a task file (list indexes left out), for "unknown field" errors
_FIELDS_AT: dict[tuple[str, ...], Any] = {(): Task.model_fields, ("output",): OutputFormat.model_fields,
                                          ("examples",): Example.model_fields}


def load_task(ref: str | Path) -> Task:
    """A shipped task by name, or a YAML file."""
    shipped = shipped_tasks()
    path = Path(ref)
    if str(ref) in shipped:
        path = shipped[str(ref)]
    elif not path.is_file():
        raise VlmkitError(f"task '{ref}': neither a shipped task{suggest(str(ref), shipped)} (shipped: "
                          f"{listing(shipped)}) nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise VlmkitError(f"task file {path}: cannot be read as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise VlmkitError(f"task file {path}: expected a mapping of task fields")
    try:
        return Task.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top)"
            if e["type"] == "extra_forbidden":
                field = str(e["loc"][-1])
                allowed = _FIELDS_AT.get(tuple(p for p in e["loc"][:-1] if not isinstance(p, int)), {})
                problems.append(f"{loc}: unknown field{suggest(field, allowed)}"
                                + (f" allowed: {', '.join(allowed)}" if allowed else ""))
            else:
                problems.append(f"{loc}: {e['msg']}")
        raise VlmkitError(f"task file {path}: " + "; ".join(problems)) from None
