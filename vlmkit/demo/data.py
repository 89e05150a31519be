"""A small, generated, fully known data set in the real on-disk formats, for demos and tests.

:func:`write_demo_data` draws scenes of coloured shapes and clips of two moving shapes, and writes:

- MIMIC-IT (REFERENCE 1.6), all images in one parquet file ``DEMO.parquet`` (pandas index ``id``,
  one column ``base64``: URL-safe base64 of a PNG, several row groups):

  - ``DEMO_instructions.json``: questions about still scenes with exact one-word answers. Every
    scene shows three groups, one per column (left, middle, right): the circles, the squares and
    the triangles, each one to three objects of one colour filling their column from the top.
    Each scene is asked one question of each of four types: "What colour are the squares?" ->
    "red", "How many circles are there?" -> "two", "Where are the triangles?" -> "left", "Which
    shape is on the right?" -> "square". In-context examples of the three MIMIC-IT kinds
    (REFERENCE 1.6 a, b, c) are in two train configs, each training instruction in exactly one
    of them: ``DEMO_train.json`` (group IMAGE_TEXT: no examples, or other questions about the same
    image, which share its media) and ``DEMO_ICL_train.json`` (group IMAGE_TEXT_IN_CONTEXT:
    questions of the same type about another target in images of other families, or colour and
    count questions about the other images of the same layout; every example has its own image).
    ``rel_ins_ids`` hold the same lists.
  - ``DEMO_VIDEO_instructions.json`` + ``DEMO_VIDEO_train.json``: clips of two shapes crossing the
    image in different directions (frames are the image ids ``<clip>_0000``, ``<clip>_0001`` ...):
    "Which way is the circle moving?" -> "left", "What colour is the shape moving up?" -> "blue",
    "Which shape is moving down?" -> "square"; half the colour and shape questions have the
    clip's other one of the two as an in-context example.
  - ``DEMO_TEXT_instructions.json`` + ``DEMO_TEXT_train.json``: text-only sums in words.
  - ``DEMO_EVAL_instructions.json`` and ``DEMO_VIDEO_EVAL_instructions.json``: the held-out split
    (scenes, clips and instruction ids that no training file uses; no held-out scene looks like a
    training scene), no in-context examples; ``DEMO_EVAL_types.json`` maps each held-out
    instruction id to its question type (``colour``, ``count``, ``where``, ``shape``, ``video
    direction``, ``video colour``, ``video shape``), for the ``instructions`` evaluator's
    per-type accuracy.
  - ``DEMO_ICL_EVAL_instructions.json`` + ``DEMO_ICL_EVAL_train.json`` (group
    IMAGE_TEXT_IN_CONTEXT) and ``DEMO_ICL_EVAL_types.json``: the held-out still questions again
    (the same scenes, questions and answers as ``DEMO_EVAL_instructions.json`` in the same order,
    ``DEMO_ICL_EVAL_INS_00001`` being ``DEMO_EVAL_INS_00001``), each with three in-context
    examples as the training ICL config gives them: its two kinds dealt in turn, questions of the
    same type about another target in training scenes, or colour and count questions about the
    images of a training family of the query's layout. Only the query is held out: the examples
    are training instructions, copied into the same file under their own ids
    (``DEMO_ICL_EVAL_EX_00001`` ...; ``copy_of`` in ``DEMO_scenes.json`` names the original), so
    that one instructions file holds queries and examples. Held-out accuracy with and without
    in-context examples is then measured on the same questions.

- LLaVA-format captions for an alignment stage: ``captions.json`` (training scenes) and
  ``captions_eval.json`` (held-out scenes), ``[{id, image, caption}]`` with the image paths
  relative to ``images/`` (the same PNGs as in the parquet file). A caption names everything the
  questions ask, every group's count, colour, shape and column, left to right: "a red square on
  the left, two blue circles in the middle and three green triangles on the right".
- ``DEMO_scenes.json``: what was drawn (every object's shape, colour, column, row, centre and
  radius; each clip's shapes and their paths) and, for every instruction, what it asks (type,
  target) and its in-context kind, so the answers can be checked.
- ``manifest.json`` and ``README.md``: files, counts, seed and the recipe ``data:`` entries.

Readable from the pixels: objects sit at fixed places (the cells of a 3x3 grid; in a clip, even
steps along a row or column), so that the frozen encoder's features tell colours and counts apart,
not only shapes and places. ``benchmarks/probe_demo_features.py`` measures, per question type, how
well a linear probe of the recipe encoder's features reads the answers (the feature ceiling).

Version 5 added the ``DEMO_ICL_EVAL`` files and changed nothing else: every file of version 4 is
the same but for the version number in its metadata (tested against version 4's digests).

Not gameable: the question does not tell the answer (each type's answers are kept even over a
split, and every shape, column or direction is asked about alike whatever the answer; the wording
does not depend on the scene: "What colour are the squares?" even for one square), and no
in-context example gives its query's answer away (:func:`context_allowed`): no example repeats the
query's question; colours and counts are drawn independently for every group of every image, so
knowing one tells nothing of another; the shapes' columns are a permutation, so an example about
the same image or layout (for a held-out query, the training family chosen for its layout) never
asks about the layout (where, shape) when the query does; and of a clip's questions only its colour and shape questions are examples of each other (a direction
question names a shape and tells where it moves).

The same ``seed`` and ``size`` give byte-identical files. :func:`demo_data_dir` keeps one copy per
seed in the user's cache (``$VLMKIT_CACHE``, else ``$XDG_CACHE_HOME/vlmkit``, else
``~/.cache/vlmkit``), written once, atomically. :func:`build_demo` generates the same data in
memory.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlmkit.datasets.toy import SHAPES
from vlmkit.core.errors import VlmkitError

__all__ = [
    "DEMO_VERSION",
    "SIZES",
    "COLUMNS",
    "DIRECTIONS",
    "NUMBER_WORDS",
    "SCENE_KINDS",
    "CLIP_KINDS",
    "write_demo_data",
    "build_demo",
    "demo_data_dir",
    "cache_root",
    "cached_folder",
    "recipe_data",
    "summary",
    "recipe_snippet",
    "render_scene",
    "render_frame",
    "scene_targets",
    "scene_question",
    "scene_answer",
    "scene_caption",
    "clip_question",
    "clip_targets",
    "clip_answer",
    "context_allowed",
]

#: bump when the generated data changes: the cache keeps one folder per version (5: the held-out
#: in-context evaluation files ``DEMO_ICL_EVAL_*`` added; every file of version 4 is unchanged but for
#: this number in its metadata)
DEMO_VERSION = 5

#: how much to generate: still scenes (train / held out; training scenes come in families of
#: :data:`FAMILY` that share a layout), clips (train / held out) and their frames, text-only sums
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"train_scenes": 24, "eval_scenes": 12, "train_clips": 8, "eval_clips": 4, "frames": 4, "text": 8},
    "small": {"train_scenes": 200, "eval_scenes": 40, "train_clips": 96, "eval_clips": 12, "frames": 4, "text": 24},
    "medium": {"train_scenes": 1000, "eval_scenes": 200, "train_clips": 480, "eval_clips": 48, "frames": 8, "text": 80},
}
#: training scenes per family: the same layout (which shape in which column), colours and
#: counts drawn anew for each (the "similar image" in-context kind)
FAMILY = 4

COLUMNS = ("left", "middle", "right")
DIRECTIONS = ("left", "right", "up", "down")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
)
BACKGROUND = (245, 245, 245)
#: the fill colours: a brighter blue and yellow and a purer green than ``toy_captions``' (the
#: frozen EfficientNet-Lite0's last stage tells colours apart less well than shapes, and
#: confused blue with green and yellow most; ``benchmarks/probe_demo_features.py``)
COLOURS = {"red": (230, 25, 25), "green": (20, 180, 20), "blue": (30, 110, 255), "yellow": (250, 220, 0)}
#: question types about still scenes; "where" and "shape" ask about the layout
SCENE_KINDS = ("colour", "count", "where", "shape")
LAYOUT_KINDS = ("where", "shape")
#: question types about clips
CLIP_KINDS = ("direction", "colour", "shape")

PREFIX = "DEMO"
FILES = {
    "images": f"{PREFIX}.parquet",
    "instructions": f"{PREFIX}_instructions.json",
    "train_config": f"{PREFIX}_train.json",
    "icl_train_config": f"{PREFIX}_ICL_train.json",
    "video_instructions": f"{PREFIX}_VIDEO_instructions.json",
    "video_train_config": f"{PREFIX}_VIDEO_train.json",
    "text_instructions": f"{PREFIX}_TEXT_instructions.json",
    "text_train_config": f"{PREFIX}_TEXT_train.json",
    "eval_instructions": f"{PREFIX}_EVAL_instructions.json",
    "video_eval_instructions": f"{PREFIX}_VIDEO_EVAL_instructions.json",
    "eval_types": f"{PREFIX}_EVAL_types.json",
    "icl_eval_instructions": f"{PREFIX}_ICL_EVAL_instructions.json",
    "icl_eval_train_config": f"{PREFIX}_ICL_EVAL_train.json",
    "icl_eval_types": f"{PREFIX}_ICL_EVAL_types.json",
    "scenes": f"{PREFIX}_scenes.json",
    "captions": "captions.json",
    "captions_eval": "captions_eval.json",
    "image_folder": "images",
    "manifest": "manifest.json",
    "readme": "README.md",
}

# the in-context kinds (REFERENCE 1.6 a, b, c) as DEMO_scenes.json names them
NO_CONTEXT, SAME_IMAGE, SIMILAR_TEXT, SIMILAR_IMAGE = "none", "same_image", "similar_text", "similar_image"
_CONTEXT_EXAMPLES = 3  # examples per instruction in the text/image-similarity kinds


# ------------------------------------------------------------------------------------------- drawing
def _radius(size: int) -> int:
    """A radius of an eighth of the image: at 224 px an object covers about 2x2 tokens of a 7x7
    feature map, so the encoder's tokens see it and not only background."""
    return max(2, size // 8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: int, cy: int, r: int) -> None:
    fill = COLOURS[colour]
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict[str, Any]) -> Image.Image:
    """A still scene from its description (``DEMO_scenes.json``'s ``scenes`` entries)."""
    size = scene["size"]
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        _draw(draw, obj["shape"], obj["colour"], obj["cx"], obj["cy"], obj["r"])
    return image


def render_frame(clip: dict[str, Any], frame: int) -> Image.Image:
    """Frame ``frame`` of a clip from its description (``DEMO_scenes.json``'s ``clips`` entries)."""
    size = clip["size"]
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in clip["objects"]:
        cx, cy = obj["path"][frame]
        _draw(draw, obj["shape"], obj["colour"], cx, cy, clip["r"])
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _least_given(given: dict[str, int], answers: dict[str, str], rng: random.Random) -> str:
    """Of ``answers`` (target -> its answer), a target whose answer was given least so far (ties
    drawn), counted in ``given``: a split's answers to a question type stay even."""
    least = min(given.get(answer, 0) for answer in answers.values())
    answer = rng.choice(sorted({a for a in answers.values() if given.get(a, 0) == least}))
    given[answer] = least + 1
    return rng.choice([t for t, a in answers.items() if a == answer])


class _Deck:
    """Draws that are even over a split: every value once per round, each round shuffled."""

    def __init__(self, values: Any, rng: random.Random):
        self.values, self.rng, self.pool = list(values), rng, []

    def draw(self) -> Any:
        if not self.pool:
            self.pool = list(self.values)
            self.rng.shuffle(self.pool)
        return self.pool.pop()


# ------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class _Group:
    """Objects of one shape (``count`` of them, one colour) stacked in one column."""

    shape: str
    colour: str
    count: int
    column: str


def _groups(layout: tuple[str, ...], rng: random.Random) -> tuple[_Group, ...]:
    """A group per column, the shapes in ``layout`` order; colour and count drawn independently
    for every group (two groups may share a colour or a count: knowing one tells nothing of another)."""
    colours = sorted(COLOURS)
    return tuple(_Group(shape, rng.choice(colours), rng.randint(1, 3), COLUMNS[c]) for c, shape in enumerate(layout))


def _layout(groups: tuple[_Group, ...], size: int) -> list[dict[str, Any]]:
    """Objects with centres: a column is a third of the width, a group's objects fill its column
    from the top, one per third of the height, each at its cell's centre. Fixed places: the count
    is how far down a column reaches, and a colour or shape is always seen at the same tokens
    (objects placed at random rows and jittered in their cells: a linear probe of the demo
    encoder's features read a group's colour right 0.87 of the time and its count 0.82; like this
    0.97 and 1.00)."""
    r = _radius(size)
    cell = size / 3
    objects = []
    for group in groups:
        column = COLUMNS.index(group.column)
        for row in range(group.count):
            objects.append({"shape": group.shape, "colour": group.colour, "column": group.column, "row": row,
                            "cx": int(cell * (column + 0.5)), "cy": int(cell * (row + 0.5)), "r": r})
    return objects


def _groups_of(scene: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """shape -> {colour, count, column} from a scene's objects."""
    groups: dict[str, dict[str, Any]] = {}
    for obj in scene["objects"]:
        group = groups.setdefault(obj["shape"], {"colour": obj["colour"], "count": 0, "column": obj["column"]})
        group["count"] += 1
    return groups


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


def _place(column: str) -> str:
    return "in the middle" if column == "middle" else f"on the {column}"


def scene_targets(kind: str) -> tuple[str, ...]:
    """What a question of ``kind`` can ask about: a shape, or for "shape" a column."""
    if kind in ("colour", "count", "where"):
        return SHAPES
    if kind == "shape":
        return COLUMNS
    raise ValueError(f"unknown question kind {kind!r}")


def scene_question(kind: str, target: str, scene: dict[str, Any] | None = None) -> str:
    """The instruction text of a question about a scene: about the group of shape ``target``, or
    for ``kind`` "shape" about column ``target``. The wording does not depend on the scene (always
    plural: "What colour are the squares?" even for one square, so it does not tell the count)."""
    if kind == "colour":
        return f"What colour are the {target}s?"
    if kind == "count":
        return f"How many {target}s are there?"
    if kind == "where":
        return f"Where are the {target}s?"
    if kind == "shape":
        return f"Which shape is {_place(target)}?"
    raise ValueError(f"unknown question kind {kind!r}")


def scene_answer(kind: str, target: str, scene: dict[str, Any]) -> str:
    """The exact answer to a question about a scene, from the scene's description."""
    groups = _groups_of(scene)
    if kind == "shape":
        shapes = [shape for shape, group in groups.items() if group["column"] == target]
        if len(shapes) != 1:
            raise ValueError(f"column {target!r} holds {len(shapes)} groups")
        return shapes[0]
    group = groups[target]
    if kind == "colour":
        return group["colour"]
    if kind == "count":
        return NUMBER_WORDS[group["count"]]
    if kind == "where":
        return group["column"]
    raise ValueError(f"unknown question kind {kind!r}")


def scene_caption(scene: dict[str, Any]) -> str:
    """``a red square on the left, two blue circles in the middle and three green triangles on the
    right``: every group's count, colour, shape and column, left to right."""
    groups = sorted(_groups_of(scene).items(), key=lambda item: COLUMNS.index(item[1]["column"]))
    parts = []
    for shape, group in groups:
        amount = "a" if group["count"] == 1 else NUMBER_WORDS[group["count"]]
        parts.append(f"{amount} {group['colour']} {_plural(shape, group['count'])} {_place(group['column'])}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def context_allowed(query: dict[str, Any], example: dict[str, Any], query_text: str, example_text: str) -> bool:
    """Whether instruction ``example`` may be an in-context example of ``query`` (both
    ``DEMO_scenes.json`` ``instructions`` entries, with their instruction texts) without telling
    its answer: never the same question, nor the same type about the same image or clip; about the
    same image or another image of its family (the same layout: which shape in which column), or,
    for a held-out query, about an image of the training family chosen for having its layout (its
    ``similar_family``), never a layout question (where, shape) for a layout query (images of other
    families have layouts drawn independently of the query's: their answers tell nothing of its
    answer); about a clip, only its colour question for its shape question and the reverse."""
    if example_text == query_text or example["kind"] == query["kind"] and example["about"] == query["about"]:
        return False
    if query.get("clip"):  # a direction question and its answer, or the colour or shape of the shape moving
        # somewhere, tell which shape moves where: only the colour and the shape question go together
        return "direction" not in (query["kind"], example["kind"])
    same_layout = (query["about"] == example["about"] or query.get("family") == example.get("family")
                   or query.get("similar_family") is not None and query["similar_family"] == example.get("family"))
    return not (same_layout and query["kind"] in LAYOUT_KINDS and example["kind"] in LAYOUT_KINDS)


# -------------------------------------------------------------------------------------------- clips
def _path(size: int, r: int, frames: int, direction: str, lane: int) -> list[list[int]]:
    """Centres frame by frame of a shape crossing the image in ``direction`` in even steps, along
    ``lane`` (a row's or a column's centre)."""
    margin = r + 2
    along = [round(margin + (size - 2 * margin) * f / (frames - 1)) for f in range(frames)]
    if direction in ("left", "up"):
        along.reverse()
    return [[a, lane] for a in along] if direction in ("left", "right") else [[lane, a] for a in along]


def _random_clip(rng: random.Random, size: int, frames: int, shape: str, colour: str, direction: str) -> dict[str, Any]:
    """A clip of two shapes crossing the image at once in different directions: a ``colour``
    ``shape`` moving in ``direction``, and a shape of another shape and colour moving in another
    direction. Each keeps to one of the three rows or columns (lanes) and crosses it in even steps
    (fixed places, as in the scenes); the lanes are drawn among those where the two never overlap."""
    r = _radius(size)
    other = {"shape": rng.choice([s for s in SHAPES if s != shape]),
             "colour": rng.choice([c for c in sorted(COLOURS) if c != colour]),
             "direction": rng.choice([d for d in DIRECTIONS if d != direction])}
    objects = [{"shape": shape, "colour": colour, "direction": direction}, other]
    rng.shuffle(objects)  # the order they are drawn in (the later one on top) tells nothing
    lanes = [int(size / 3 * (i + 0.5)) for i in range(3)]
    fits = []
    for pair in itertools.product(lanes, lanes):
        paths = [_path(size, r, frames, obj["direction"], lane) for obj, lane in zip(objects, pair)]
        if all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 2 * r + 2 for a, b in zip(*paths)):
            fits.append(paths)
    if not fits:  # pragma: no cover - every pair of directions has room at every image size
        raise VlmkitError(f"demo data: no room for two moving shapes in a {size} px clip")
    paths = rng.choice(fits)
    return {"size": size, "r": r, "objects": [{**obj, "path": path} for obj, path in zip(objects, paths)]}


def _mover(clip: dict[str, Any], **match: str) -> dict[str, Any]:
    """The one shape of a clip with the given attributes."""
    found = [obj for obj in clip["objects"] if all(obj[k] == v for k, v in match.items())]
    if len(found) != 1:
        raise ValueError(f"{len(found)} shapes of the clip match {match}")
    return found[0]


def clip_targets(kind: str, clip: dict[str, Any]) -> list[str]:
    """What a question of ``kind`` can ask about in ``clip``: one of its two shapes for "direction",
    one of their two directions for "colour" and "shape"."""
    if kind == "direction":
        return [obj["shape"] for obj in clip["objects"]]
    if kind in ("colour", "shape"):
        return [obj["direction"] for obj in clip["objects"]]
    raise ValueError(f"unknown clip question kind {kind!r}")


def clip_question(kind: str, target: str) -> str:
    """The instruction text of a question about a clip: the direction of the ``target`` shape
    ("circle"), or the colour or shape of the shape moving in direction ``target``."""
    if kind == "direction":
        return f"Which way is the {target} moving?"
    if kind == "colour":
        return f"What colour is the shape moving {target}?"
    if kind == "shape":
        return f"Which shape is moving {target}?"
    raise ValueError(f"unknown clip question kind {kind!r}")


def clip_answer(kind: str, target: str, clip: dict[str, Any]) -> str:
    """The exact answer to a question about a clip, from its description."""
    if kind == "direction":
        return _mover(clip, shape=target)["direction"]
    if kind in ("colour", "shape"):
        return _mover(clip, direction=target)[kind]
    raise ValueError(f"unknown clip question kind {kind!r}")


# ----------------------------------------------------------------------------------------- building
class _Builder:
    def __init__(self, seed: int, size: str, image_size: int, counts: dict[str, int] | None = None):
        if size not in SIZES:
            raise VlmkitError(f"demo data size {size!r} unknown; choose one of: {', '.join(SIZES)}")
        if not 32 <= image_size <= 224:
            raise VlmkitError(f"demo data image_size {image_size}: must be between 32 and 224")
        self.seed, self.size_name, self.image_size = seed, size, image_size
        self.counts = {**SIZES[size], **(counts or {})}
        self.images: list[tuple[str, bytes]] = []  # (image id, PNG) in parquet order
        self.scenes: dict[str, dict[str, Any]] = {}
        self.clips: dict[str, dict[str, Any]] = {}
        self.questions: dict[str, dict[str, Any]] = {}  # instruction id -> what it asks, its context kind
        self.drawn: set[tuple[_Group, ...]] = set()  # the scenes drawn so far

    def rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(map(str, (self.seed, *parts))))

    def build(self) -> _Builder:
        counts = self.counts
        self.train_scenes = self.add_scenes("train", counts["train_scenes"], family_size=FAMILY)
        self.eval_scenes = self.add_scenes("eval", counts["eval_scenes"], family_size=1)
        self.train = self.scene_instructions("train", self.train_scenes, f"{PREFIX}_INS_")
        self.scene_contexts(self.train)
        self.evaluation = self.scene_instructions("eval", self.eval_scenes, f"{PREFIX}_EVAL_INS_")
        self.video = self.add_clips("train", counts["train_clips"], f"{PREFIX}_VID_INS_", contexts=True)
        self.video_eval = self.add_clips("eval", counts["eval_clips"], f"{PREFIX}_VID_EVAL_INS_", contexts=False)
        self.text = self.text_only(counts["text"], f"{PREFIX}_TXT_INS_")
        # last, so that everything above (and DEMO_scenes.json's order) is what it was without it
        self.icl_eval, self.icl_eval_config = self.held_out_contexts(f"{PREFIX}_ICL_EVAL_INS_",
                                                                     f"{PREFIX}_ICL_EVAL_EX_")
        return self

    # ---------------------------------------------------------------------------------- stills
    def add_scenes(self, split: str, count: int, family_size: int) -> list[str]:
        """``count`` scenes; every ``family_size`` consecutive ones share a layout (one of the six
        orders of the three shapes, drawn independently for every family), colours and counts are
        drawn per scene. No two scenes look the same, and no held-out scene looks like a training
        scene (a scene drawn again is redrawn)."""
        ids = []
        layouts = list(itertools.permutations(SHAPES))
        layout: tuple[str, ...] = ()
        for n in range(count):
            family = n // family_size
            if n % family_size == 0:
                layout = self.rng("layout", split, family).choice(layouts)
            rng = self.rng("groups", split, n)
            groups = _groups(layout, rng)
            for _ in range(10_000):
                if groups not in self.drawn:
                    break
                groups = _groups(layout, rng)
            else:
                raise VlmkitError(f"demo data: {count} {split} scenes: more than there are different scenes")
            self.drawn.add(groups)
            image_id = f"{PREFIX}_IMG_{split}{n + 1:05d}"
            scene = {"split": split, "family": f"{split}{family:05d}", "layout": " ".join(layout),
                     "size": self.image_size, "objects": _layout(groups, self.image_size)}
            self.scenes[image_id] = scene
            self.images.append((image_id, _png(render_scene(scene))))
            ids.append(image_id)
        return ids

    def scene_instructions(self, split: str, image_ids: list[str], prefix: str) -> dict[str, dict[str, Any]]:
        """One question of each type per scene, its answers kept even over the split: of the
        answers the scene offers for a type, the one given least so far (ties drawn), asked about
        a group (for "shape": a column) that has it. Every shape and column is equally likely to
        be asked about whatever the answer (layouts, colours and counts are drawn alike for every
        shape and column), so the question does not tell the answer."""
        given: dict[str, dict[str, int]] = {kind: {} for kind in SCENE_KINDS}
        data: dict[str, dict[str, Any]] = {}
        for image_id in image_ids:
            scene = self.scenes[image_id]
            rng = self.rng("targets", image_id)
            for kind in SCENE_KINDS:
                answers = {t: scene_answer(kind, t, scene) for t in scene_targets(kind)}
                target = _least_given(given[kind], answers, rng)
                ins_id = f"{prefix}{len(data) + 1:05d}"
                data[ins_id] = {"instruction": scene_question(kind, target),
                                "answer": scene_answer(kind, target, scene), "image_ids": [image_id], "rel_ins_ids": []}
                self.questions[ins_id] = {"split": split, "about": image_id, "family": scene["family"],
                                          "layout": scene["layout"], "kind": kind, "target": target,
                                          "in_context": NO_CONTEXT}
        return data

    def scene_contexts(self, data: dict[str, dict[str, Any]]) -> None:
        """In-context examples of training questions, a quarter of each kind (dealt): none; (a)
        the other questions about the same image that :func:`context_allowed` admits; (b) three
        questions of the same type about another target, in images of other families; (c) three
        colour or count questions about the other images of the family (same layout)."""
        by_image: dict[str, list[str]] = {}
        by_kind: dict[str, list[str]] = {}
        by_family: dict[str, list[str]] = {}
        for ins_id, ins in data.items():
            q = self.questions[ins_id]
            by_image.setdefault(q["about"], []).append(ins_id)
            by_kind.setdefault(q["kind"], []).append(ins_id)
            by_family.setdefault(q["family"], []).append(ins_id)
        modes = _Deck((NO_CONTEXT, SAME_IMAGE, SIMILAR_TEXT, SIMILAR_IMAGE), self.rng("context modes"))

        def allowed(ins_id: str, other: str) -> bool:
            return context_allowed(self.questions[ins_id], self.questions[other], data[ins_id]["instruction"],
                                   data[other]["instruction"])

        for ins_id, ins in data.items():
            q = self.questions[ins_id]
            rng = self.rng("context", ins_id)
            mode = modes.draw()
            if mode == SAME_IMAGE:
                pool = [i for i in by_image[q["about"]] if i != ins_id]
            elif mode == SIMILAR_TEXT:
                pool = [i for i in by_kind[q["kind"]] if self.questions[i]["family"] != q["family"]]
            elif mode == SIMILAR_IMAGE:
                pool = [i for i in by_family[q["family"]] if self.questions[i]["about"] != q["about"]
                        and self.questions[i]["kind"] not in LAYOUT_KINDS]
            else:
                pool = []
            pool = [i for i in pool if allowed(ins_id, i)]
            if mode != SAME_IMAGE and len(pool) > _CONTEXT_EXAMPLES:
                pool = sorted(rng.sample(pool, _CONTEXT_EXAMPLES), key=pool.index)
            if not pool:
                mode = NO_CONTEXT
            ins["rel_ins_ids"] = pool
            q["in_context"] = mode

    def held_out_contexts(self, prefix: str, example_prefix: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
        """The held-out still questions again (those of :attr:`evaluation`, in order, as new ids
        ``prefix``...), each with in-context examples as the training ICL config gives them: the
        two kinds of ``DEMO_ICL_train.json`` dealt in turn, three examples each, (b) questions of
        the same type about another target in training scenes (every training scene is of another
        family), or (c) colour and count questions about the images of a training family of the
        query's layout (drawn among those families; ``similar_family`` in the query's
        description). Only the query is held out: the examples are training instructions,
        copied with ids ``example_prefix``... (one copy per training instruction used, no
        ``rel_ins_ids``), so that one instructions file holds queries and examples. Every example
        is one :func:`context_allowed` admits. Returns (instructions: queries, then examples;
        train config: query -> example ids)."""
        by_kind: dict[str, list[str]] = {}
        by_family: dict[str, list[str]] = {}
        families: dict[str, list[str]] = {}  # layout -> its training families
        for ins_id in self.train:
            q = self.questions[ins_id]
            by_kind.setdefault(q["kind"], []).append(ins_id)
            by_family.setdefault(q["family"], []).append(ins_id)
            if q["family"] not in families.setdefault(q["layout"], []):
                families[q["layout"]].append(q["family"])
        modes = _Deck((SIMILAR_TEXT, SIMILAR_IMAGE), self.rng("held-out context modes"))
        queries: dict[str, dict[str, Any]] = {}
        examples: dict[str, dict[str, Any]] = {}
        config: dict[str, list[str]] = {}
        copies: dict[str, str] = {}  # training instruction id -> its copy's id
        for eval_id, ins in self.evaluation.items():
            query = {**self.questions[eval_id], "copy_of": eval_id}
            rng = self.rng("held-out context", eval_id)
            mode, pool = modes.draw(), []
            if mode == SIMILAR_IMAGE and families.get(query["layout"]):
                query["similar_family"] = rng.choice(families[query["layout"]])
                pool = [i for i in by_family[query["similar_family"]] if self.questions[i]["kind"] not in LAYOUT_KINDS]
            if not pool:  # no training family of this layout (only in a tiny set): the other kind
                mode = SIMILAR_TEXT
                pool = list(by_kind[query["kind"]])
            pool = [i for i in pool if context_allowed(query, self.questions[i], ins["instruction"],
                                                       self.train[i]["instruction"])]
            if len(pool) > _CONTEXT_EXAMPLES:
                pool = sorted(rng.sample(pool, _CONTEXT_EXAMPLES), key=pool.index)
            if not pool:  # pragma: no cover - every type is asked of every training scene
                raise VlmkitError(f"demo data: no in-context example for held-out question {eval_id}")
            for train_id in pool:
                if train_id not in copies:
                    copies[train_id] = f"{example_prefix}{len(copies) + 1:05d}"
                    source = self.train[train_id]
                    examples[copies[train_id]] = {"instruction": source["instruction"], "answer": source["answer"],
                                                  "image_ids": list(source["image_ids"]), "rel_ins_ids": []}
                    self.questions[copies[train_id]] = {**self.questions[train_id], "in_context": NO_CONTEXT,
                                                        "copy_of": train_id}
            ins_id = f"{prefix}{len(queries) + 1:05d}"
            config[ins_id] = [copies[i] for i in pool]
            queries[ins_id] = {"instruction": ins["instruction"], "answer": ins["answer"],
                               "image_ids": list(ins["image_ids"]), "rel_ins_ids": config[ins_id]}
            self.questions[ins_id] = {**query, "in_context": mode}
        return {**queries, **examples}, config

    # ----------------------------------------------------------------------------------- clips
    def add_clips(self, split: str, count: int, prefix: str, contexts: bool) -> dict[str, dict[str, Any]]:
        """``count`` clips; one of the two shapes' shape, colour and direction are dealt evenly over
        the split, the other's drawn from the rest. Each clip is asked the three question types,
        each about the one of its two shapes whose answer was given least so far (ties drawn). With
        ``contexts``, half the training colour and shape questions get the clip's other one of the
        two as an in-context example (what :func:`context_allowed` admits)."""
        frames = self.counts["frames"]
        decks = {"shape": _Deck(SHAPES, self.rng("clip shapes", split)),
                 "colour": _Deck(sorted(COLOURS), self.rng("clip colours", split)),
                 "direction": _Deck(DIRECTIONS, self.rng("clip directions", split))}
        given: dict[str, dict[str, int]] = {kind: {} for kind in CLIP_KINDS}
        data: dict[str, dict[str, Any]] = {}
        for n in range(count):
            clip_id = f"{PREFIX}_VID_{split}{n + 1:05d}"
            rng = self.rng("clip", split, n)
            drawn = {key: deck.draw() for key, deck in decks.items()}
            clip = _random_clip(rng, self.image_size, frames, **drawn)
            clip["split"] = split
            clip["frames"] = [f"{clip_id}_{f:04d}" for f in range(frames)]
            self.clips[clip_id] = clip
            for f, frame_id in enumerate(clip["frames"]):
                self.images.append((frame_id, _png(render_frame(clip, f))))
            ids = []
            for kind in CLIP_KINDS:
                answers = {t: clip_answer(kind, t, clip) for t in clip_targets(kind, clip)}
                target = _least_given(given[kind], answers, rng)
                ins_id = f"{prefix}{len(data) + 1:05d}"
                ids.append(ins_id)
                data[ins_id] = {"instruction": clip_question(kind, target), "answer": clip_answer(kind, target, clip),
                                "image_ids": list(clip["frames"]), "rel_ins_ids": []}
                self.questions[ins_id] = {"split": split, "about": clip_id, "clip": True, "kind": kind,
                                          "target": target, "in_context": NO_CONTEXT}
            if contexts:
                for ins_id in ids:
                    pool = [i for i in ids if i != ins_id and context_allowed(
                        self.questions[ins_id], self.questions[i], data[ins_id]["instruction"], data[i]["instruction"])]
                    if pool and self.rng("context", ins_id).random() < 0.5:
                        data[ins_id]["rel_ins_ids"] = pool
                        self.questions[ins_id]["in_context"] = SAME_IMAGE
        return data

    # ------------------------------------------------------------------------------------ text
    def text_only(self, count: int, prefix: str) -> dict[str, dict[str, Any]]:
        pairs = [(a, b) for a in range(10) for b in range(10)]
        chosen = self.rng("text").sample(pairs, min(count, len(pairs)))
        data = {}
        for n, (a, b) in enumerate(chosen):
            ins_id = f"{prefix}{n + 1:05d}"
            data[ins_id] = {"instruction": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
                            "answer": NUMBER_WORDS[a + b], "rel_ins_ids": []}
            self.questions[ins_id] = {"split": "train", "about": None, "kind": "sum", "target": None,
                                      "operands": [a, b], "in_context": NO_CONTEXT}
        return data


def build_demo(seed: int = 0, size: str = "small", image_size: int = 224,
               counts: dict[str, int] | None = None) -> _Builder:
    """The demo data in memory, as :func:`write_demo_data` writes it: ``.scenes``, ``.clips``,
    ``.questions`` (instruction id -> what it asks), ``.images`` (id, PNG bytes), the instructions
    of each part (``.train``, ``.evaluation``, ``.video``, ``.video_eval``, ``.text``; ``.icl_eval``
    with ``.icl_eval_config``, its queries' examples) and the scene ids (``.train_scenes``,
    ``.eval_scenes``). ``counts`` overrides :data:`SIZES` ``[size]``
    entries; everything is drawn per index and per split, so more scenes or clips extend a split
    (its first ones are those of the smaller set)."""
    return _Builder(int(seed), size, int(image_size), counts).build()


def _instructions_file(data: dict[str, Any], seed: int, split: str, group: str) -> dict[str, Any]:
    meta = {"version": f"vlmkit-demo-{DEMO_VERSION}", "author": "vlmkit", "seed": seed, "split": split,
            "group": group}
    return {"meta": meta, "data": data}


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_parquet(path: Path, images: list[tuple[str, bytes]]) -> int:
    """``images`` as rows (pandas index ``id``, column ``base64``: URL-safe base64 of the PNG) in
    several row groups; returns the number of row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas = {
        "index_columns": ["id"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "base64", "field_name": "base64", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
            {"name": "id", "field_name": "id", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "vlmkit", "version": str(DEMO_VERSION)},
        "pandas_version": "2.0.0",
    }
    schema = pa.schema([("base64", pa.string()), ("id", pa.string())]).with_metadata(
        {b"pandas": json.dumps(pandas).encode("utf-8")}
    )
    table = pa.table(
        {"base64": [base64.urlsafe_b64encode(png).decode("ascii") for _, png in images],
         "id": [image_id for image_id, _ in images]},
        schema=schema,
    )
    rows_per_group = max(1, min(64, math.ceil(len(images) / 4)))
    pq.write_table(table, path, row_group_size=rows_per_group, compression="snappy")
    return math.ceil(len(images) / rows_per_group)


# ------------------------------------------------------------------------------------------ recipes
def recipe_data(root: str | Path = ".", frames: int = SIZES["small"]["frames"]) -> dict[str, dict[str, Any]]:
    """The recipe ``data:`` entries that use the demo data in ``root`` (paths joined to it; the
    bare file names for ``"."``); ``frames``: frames per clip."""

    def p(key: str) -> str:
        return str(Path(root) / FILES[key]) if str(root) not in ("", ".") else FILES[key]

    def mimicit(group: str, instructions: str, train_config: str | None, **more: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "mimicit", "template": "otter", "group": group,
                                 "instructions": p(instructions)}
        if group != "TEXT_ONLY":
            entry["images"] = p("images")
        if train_config is not None:
            entry["train_config"] = p(train_config)
        return {**entry, **more}

    return {
        "demo_captions": {"type": "captions", "template": "llava_plain", "path": p("captions"),
                          "image_folder": p("image_folder")},
        "demo_images": mimicit("IMAGE_TEXT", "instructions", "train_config"),
        "demo_in_context": mimicit("IMAGE_TEXT_IN_CONTEXT", "instructions", "icl_train_config"),
        "demo_video": mimicit("VIDEO_TEXT", "video_instructions", "video_train_config", num_frames=frames),
        "demo_text": mimicit("TEXT_ONLY", "text_instructions", "text_train_config"),
        "demo_eval": mimicit("IMAGE_TEXT", "eval_instructions", None),
        "demo_video_eval": mimicit("VIDEO_TEXT", "video_eval_instructions", None, num_frames=frames),
        "demo_eval_in_context": mimicit("IMAGE_TEXT_IN_CONTEXT", "icl_eval_instructions", "icl_eval_train_config"),
        "demo_captions_eval": {"type": "captions", "template": "llava_plain", "path": p("captions_eval"),
                               "image_folder": p("image_folder")},
    }


def recipe_snippet(root: str | Path = ".", frames: int = SIZES["small"]["frames"]) -> str:
    """:func:`recipe_data` as the YAML ``data:`` section of a recipe."""
    import yaml

    return yaml.safe_dump({"data": recipe_data(root, frames)}, sort_keys=False, default_flow_style=False)


def _readme(manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]
    lines = [
        "# vlmkit demo data",
        "",
        f"Generated by `recipes data demo` (vlmkit demo data version {DEMO_VERSION}, seed {manifest['seed']}, "
        f"size {manifest['size']}): drawn scenes of coloured shapes and clips of two moving shapes, with questions "
        "whose answers are exact single words. The same seed and size always give byte-identical files.",
        "",
        "Every scene shows three groups of one to three objects, one group per column: circles, squares and "
        "triangles, each group of one colour. Each scene is asked one question of each type: colour (\"What colour "
        "are the squares?\"), count (\"How many circles are there?\"), where (\"Where are the triangles?\") and shape "
        "(\"Which shape is on the left?\"). Each clip shows two shapes crossing it in different directions and is "
        "asked their directions (\"Which way is the circle moving?\"), the colour and the shape of the one moving "
        "a given way (\"What colour is the shape moving up?\", \"Which shape is moving left?\"). Each type's "
        "answers are kept even, and no in-context example gives its query's answer away.",
        "",
        "## Files",
        "",
        f"- `{FILES['images']}`: every image ({counts['images']}: {counts['train_scenes'] + counts['eval_scenes']} "
        f"scenes, {counts['frames']} clip frames), one row each: pandas index `id` (the image id), column `base64` "
        f"(URL-safe base64 of a {manifest['image_size']}x{manifest['image_size']} PNG), {counts['row_groups']} row groups.",
        f"- `{FILES['instructions']}` ({counts['train_image_instructions']} instructions): MIMIC-IT questions about "
        f"still scenes. Each is a training query in one of two train configs: `{FILES['train_config']}` (group "
        "IMAGE_TEXT: no in-context examples, or other questions about the same image) or "
        f"`{FILES['icl_train_config']}` (group IMAGE_TEXT_IN_CONTEXT: questions of the same type about another "
        "target in other images, or colour and count questions about other images of the same layout). "
        "`rel_ins_ids` hold the same lists.",
        f"- `{FILES['video_instructions']}` ({counts['train_video_instructions']}) and `{FILES['video_train_config']}`: "
        "questions about clips (frames are the image ids `<clip>_0000`, `<clip>_0001`, ... in time order); some "
        "colour and shape questions have the clip's other one as an in-context example (same media).",
        f"- `{FILES['text_instructions']}` ({counts['text_instructions']}) and `{FILES['text_train_config']}`: "
        "text-only sums (no `image_ids`).",
        f"- `{FILES['eval_instructions']}` ({counts['eval_image_instructions']}) and "
        f"`{FILES['video_eval_instructions']}` ({counts['eval_video_instructions']}): the held-out split. Its "
        "scenes, clips and instruction ids appear in no training file.",
        f"- `{FILES['eval_types']}`: held-out instruction id -> question type (colour, count, where, shape, video "
        "direction, video colour, video shape).",
        f"- `{FILES['icl_eval_instructions']}` ({counts['eval_in_context_queries']} queries, "
        f"{counts['eval_in_context_examples']} examples), `{FILES['icl_eval_train_config']}` and "
        f"`{FILES['icl_eval_types']}`: the held-out still questions again (same scenes, questions and answers as "
        f"`{FILES['eval_instructions']}`, new ids), each with three in-context examples (group "
        "IMAGE_TEXT_IN_CONTEXT) of the two kinds of the training ICL config: questions of the same type about "
        "another target in training scenes, or colour and count questions about training scenes of the query's "
        "layout. Only the query is held out: the examples are copies of training instructions (their own ids, in "
        "the same instructions file), and none gives its query's answer away.",
        f"- `{FILES['captions']}` ({counts['captions']}) and `{FILES['captions_eval']}` ({counts['captions_eval']}): "
        f"LLaVA-format captions `[{{id, image, caption}}]`, image paths relative to `{FILES['image_folder']}/`.",
        f"- `{FILES['scenes']}`: what each image and clip shows and what each instruction asks (to check answers).",
        f"- `{FILES['manifest']}`: counts, seed, file checksums and the recipe entries below.",
        "",
        "## Recipe `data:` entries (paths relative to this folder)",
        "",
        "```yaml",
        recipe_snippet(frames=manifest["counts"]["frames_per_clip"]).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- write
def write_demo_data(out: str | Path, seed: int = 0, size: str = "small", image_size: int = 224) -> dict[str, Any]:
    """Write the demo data set into ``out`` (created if needed) and return its manifest.

    ``size``: one of :data:`SIZES` (``small`` by default: a few hundred images, about a second).
    ``image_size``: square images of 32 to 224 pixels. Deterministic: the same arguments give
    byte-identical files."""
    out = Path(out)
    b = build_demo(seed, size, image_size)
    counts = b.counts
    train_scenes, eval_scenes = b.train_scenes, b.eval_scenes
    train, evaluation, video, video_eval, text = b.train, b.evaluation, b.video, b.video_eval, b.text

    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / FILES["image_folder"]
    images_dir.mkdir(exist_ok=True)
    row_groups = _write_parquet(out / FILES["images"], b.images)
    _dump_json(out / FILES["instructions"], _instructions_file(train, b.seed, "train", "IMAGE_TEXT"))
    shared = (NO_CONTEXT, SAME_IMAGE)
    _dump_json(out / FILES["train_config"],
               {k: v["rel_ins_ids"] for k, v in train.items() if b.questions[k]["in_context"] in shared})
    _dump_json(out / FILES["icl_train_config"],
               {k: v["rel_ins_ids"] for k, v in train.items() if b.questions[k]["in_context"] not in shared})
    _dump_json(out / FILES["video_instructions"], _instructions_file(video, b.seed, "train", "VIDEO_TEXT"))
    _dump_json(out / FILES["video_train_config"], {k: v["rel_ins_ids"] for k, v in video.items()})
    _dump_json(out / FILES["text_instructions"], _instructions_file(text, b.seed, "train", "TEXT_ONLY"))
    _dump_json(out / FILES["text_train_config"], {k: v["rel_ins_ids"] for k, v in text.items()})
    _dump_json(out / FILES["eval_instructions"], _instructions_file(evaluation, b.seed, "eval", "IMAGE_TEXT"))
    _dump_json(out / FILES["video_eval_instructions"], _instructions_file(video_eval, b.seed, "eval", "VIDEO_TEXT"))
    eval_types = {k: b.questions[k]["kind"] for k in evaluation}
    eval_types.update({k: f"video {b.questions[k]['kind']}" for k in video_eval})
    _dump_json(out / FILES["eval_types"], eval_types)
    _dump_json(out / FILES["icl_eval_instructions"],
               _instructions_file(b.icl_eval, b.seed, "eval", "IMAGE_TEXT_IN_CONTEXT"))
    _dump_json(out / FILES["icl_eval_train_config"], b.icl_eval_config)
    _dump_json(out / FILES["icl_eval_types"], {k: b.questions[k]["kind"] for k in b.icl_eval_config})
    _dump_json(out / FILES["scenes"], {"version": DEMO_VERSION, "seed": b.seed, "scenes": b.scenes,
                                       "clips": b.clips, "instructions": b.questions})

    pngs = dict(b.images)
    for split, image_ids, name in (("train", train_scenes, "captions"), ("eval", eval_scenes, "captions_eval")):
        entries = []
        for image_id in image_ids:
            (images_dir / f"{image_id}.png").write_bytes(pngs[image_id])
            entries.append({"id": image_id, "image": f"{image_id}.png", "caption": scene_caption(b.scenes[image_id])})
        _dump_json(out / FILES[name], entries)

    modes = {kind: 0 for kind in (NO_CONTEXT, SAME_IMAGE, SIMILAR_TEXT, SIMILAR_IMAGE)}
    for ins_id in train:
        modes[b.questions[ins_id]["in_context"]] += 1
    icl_modes = {kind: 0 for kind in (SIMILAR_TEXT, SIMILAR_IMAGE)}
    for ins_id in b.icl_eval_config:
        icl_modes[b.questions[ins_id]["in_context"]] += 1
    manifest_counts = {
        "images": len(b.images),
        "row_groups": row_groups,
        "train_scenes": len(train_scenes),
        "eval_scenes": len(eval_scenes),
        "train_clips": counts["train_clips"],
        "eval_clips": counts["eval_clips"],
        "frames": counts["frames"] * (counts["train_clips"] + counts["eval_clips"]),
        "frames_per_clip": counts["frames"],
        "train_image_instructions": len(train),
        "train_video_instructions": len(video),
        "text_instructions": len(text),
        "eval_image_instructions": len(evaluation),
        "eval_video_instructions": len(video_eval),
        "eval_in_context_queries": len(b.icl_eval_config),
        "eval_in_context_examples": len(b.icl_eval) - len(b.icl_eval_config),
        "captions": len(train_scenes),
        "captions_eval": len(eval_scenes),
        "in_context": modes,
        "eval_in_context": icl_modes,
    }
    manifest: dict[str, Any] = {
        "name": "vlmkit-demo",
        "version": DEMO_VERSION,
        "seed": b.seed,
        "size": size,
        "image_size": b.image_size,
        "counts": manifest_counts,
        "files": {},
        "recipe_data": recipe_data(frames=counts["frames"]),
    }
    readme = _readme(manifest)
    (out / FILES["readme"]).write_text(readme, encoding="utf-8")
    for key, name in FILES.items():
        if key in ("manifest", "image_folder"):
            continue
        manifest["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    manifest["files"][FILES["image_folder"] + "/"] = f"{len(train_scenes) + len(eval_scenes)} PNG files"
    _dump_json(out / FILES["manifest"], manifest)
    return manifest


def summary(manifest: dict[str, Any], root: str | Path) -> str:
    """A few lines for the command line: what was written where, and the recipe entries."""
    c = manifest["counts"]
    modes = ", ".join(f"{k} {v}" for k, v in c["in_context"].items())
    return "\n".join([
        f"demo data (version {manifest['version']}, seed {manifest['seed']}, size {manifest['size']}) in {root}",
        f"  images: {c['images']} in {FILES['images']} ({c['train_scenes']} training scenes, {c['eval_scenes']} "
        f"held-out scenes, {c['train_clips'] + c['eval_clips']} clips x {c['frames_per_clip']} frames), "
        f"{manifest['image_size']}px PNG",
        f"  training instructions: {c['train_image_instructions']} image ({modes}), "
        f"{c['train_video_instructions']} video, {c['text_instructions']} text-only",
        f"  held-out instructions: {c['eval_image_instructions']} image, {c['eval_video_instructions']} video; "
        f"the image ones again with in-context examples: {c['eval_in_context_queries']} "
        f"({', '.join(f'{k} {v}' for k, v in c['eval_in_context'].items())}; {c['eval_in_context_examples']} "
        f"training instructions copied as examples)",
        f"  captions: {c['captions']} training, {c['captions_eval']} held-out ({FILES['captions']}, "
        f"{FILES['image_folder']}/)",
        "recipe entries:",
        recipe_snippet(Path(root).resolve(), c["frames_per_clip"]).rstrip(),
    ])


# -------------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """``$VLMKIT_CACHE``, else ``$XDG_CACHE_HOME/vlmkit``, else ``~/.cache/vlmkit``."""
    if os.environ.get("VLMKIT_CACHE"):
        return Path(os.environ["VLMKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vlmkit"
    return Path.home() / ".cache" / "vlmkit"


def demo_data_dir(seed: int = 0, size: str = "small") -> Path:
    """The demo data of ``seed`` in the user's cache (``<cache>/demo-<version>-<seed>``, with
    ``-<size>`` unless small), written on first use and reused after (:func:`cached_folder`)."""
    if size not in SIZES:
        raise VlmkitError(f"demo data size {size!r} unknown; choose one of: {', '.join(SIZES)}")
    name = f"demo-{DEMO_VERSION}-{int(seed)}" + ("" if size == "small" else f"-{size}")
    return cached_folder(name, FILES["manifest"], lambda tmp: write_demo_data(tmp, seed=seed, size=size))


def cached_folder(name: str, marker: str, write: Any) -> Path:
    """``<cache>/<name>``, written by ``write(folder)`` on first use and reused after (it exists
    once ``marker`` does).

    Written into a temporary folder beside it and renamed into place, so a folder that exists is
    complete; when two processes race, one rename wins and the other's copy is discarded."""
    root = cache_root()
    final = root / name
    if (final / marker).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():  # not a finished copy of another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
