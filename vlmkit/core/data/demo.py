"""A small, generated, fully known data set in the real on-disk formats, for demos and tests.

:func:`write_demo_data` draws scenes of coloured shapes and clips of a moving shape, and writes:

- MIMIC-IT (REFERENCE 1.6), all images in one parquet file ``DEMO.parquet`` (pandas index ``id``,
  one column ``base64``: URL-safe base64 of a PNG, several row groups):

  - ``DEMO_instructions.json``: questions about still scenes with exact one-word answers ("What
    colour is the square?" -> "red", "How many circles are there?" -> "two", "Where is the
    triangle?" -> "left"), with in-context examples of the three MIMIC-IT kinds (REFERENCE 1.6
    a, b, c) in two train configs, each training instruction in exactly one of them:
    ``DEMO_train.json`` (group IMAGE_TEXT: no examples, or other questions about the same image,
    which share its media) and ``DEMO_ICL_train.json`` (group IMAGE_TEXT_IN_CONTEXT: the same
    question about other images, or questions about other images drawn from the same scene
    description; every example has its own image). ``rel_ins_ids`` hold the same lists.
  - ``DEMO_VIDEO_instructions.json`` + ``DEMO_VIDEO_train.json``: clips of a moving shape (frames
    are the image ids ``<clip>_0000``, ``<clip>_0001`` ...): "Which way is the red circle
    moving?" -> "left"; some with the clip's other questions as in-context examples.
  - ``DEMO_TEXT_instructions.json`` + ``DEMO_TEXT_train.json``: text-only sums in words.
  - ``DEMO_EVAL_instructions.json`` and ``DEMO_VIDEO_EVAL_instructions.json``: the held-out split
    (scenes, clips and instruction ids that no training file uses), no in-context examples;
    ``DEMO_EVAL_types.json`` maps each held-out instruction id to its question type (``colour``,
    ``count``, ``where``, ``total``, ``video direction``, ``video colour``, ``video shape``), for
    the ``instructions`` evaluator's per-type accuracy.

- LLaVA-format captions for an alignment stage: ``captions.json`` (training scenes) and
  ``captions_eval.json`` (held-out scenes), ``[{id, image, caption}]`` with the image paths
  relative to ``images/`` (the same PNGs as in the parquet file).
- ``DEMO_scenes.json``: what was drawn (every object's shape, colour, column, centre and radius;
  each clip's path) and, for every instruction, what it asks and its in-context kind, so the
  answers can be checked.
- ``manifest.json`` and ``README.md``: files, counts, seed and the recipe ``data:`` entries.

The same ``seed`` and ``size`` give byte-identical files. :func:`demo_data_dir` keeps one copy per
seed in the user's cache (``$VLMKIT_CACHE``, else ``$XDG_CACHE_HOME/vlmkit``, else
``~/.cache/vlmkit``), written once, atomically.
"""

from __future__ import annotations

import base64
import hashlib
import io
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

from vlmkit.core.data.toy import COLOURS, SHAPES
from vlmkit.core.errors import VlmkitError

__all__ = [
    "DEMO_VERSION",
    "SIZES",
    "COLUMNS",
    "DIRECTIONS",
    "NUMBER_WORDS",
    "write_demo_data",
    "demo_data_dir",
    "cache_root",
    "cached_folder",
    "recipe_data",
    "summary",
    "recipe_snippet",
    "render_scene",
    "render_frame",
    "scene_answer",
    "clip_answer",
]

#: bump when the generated data changes: the cache keeps one folder per version
DEMO_VERSION = 3

#: how much to generate: still scenes (train / held out; training scenes come in pairs drawn
#: from one description), clips (train / held out) and their frames, text-only sums
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"train_scenes": 24, "eval_scenes": 8, "train_clips": 6, "eval_clips": 3, "frames": 4, "text": 8},
    "small": {"train_scenes": 200, "eval_scenes": 40, "train_clips": 32, "eval_clips": 8, "frames": 4, "text": 24},
    "medium": {"train_scenes": 1000, "eval_scenes": 200, "train_clips": 160, "eval_clips": 40, "frames": 8, "text": 80},
}

COLUMNS = ("left", "middle", "right")
DIRECTIONS = ("left", "right", "up", "down")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
)
BACKGROUND = (245, 245, 245)

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
    still, moving = clip["static"], clip["moving"]
    _draw(draw, still["shape"], still["colour"], still["cx"], still["cy"], clip["r"])
    cx, cy = moving["path"][frame]
    _draw(draw, moving["shape"], moving["colour"], cx, cy, clip["r"])
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class _Group:
    """Objects of one shape (``count`` of them, one colour) stacked in one column."""

    shape: str
    colour: str
    count: int
    column: str


def _random_description(rng: random.Random) -> tuple[_Group, ...]:
    k = rng.choice((1, 2, 2, 3, 3))
    columns = sorted(rng.sample(range(3), k))
    shapes = rng.sample(SHAPES, k)
    colours = sorted(COLOURS)
    return tuple(
        _Group(shape, rng.choice(colours), rng.randint(1, 3), COLUMNS[c]) for c, shape in zip(columns, shapes)
    )


def _layout(groups: tuple[_Group, ...], size: int, rng: random.Random) -> list[dict[str, Any]]:
    """Objects with centres: a column is a third of the width, each object in its own third of the
    height, jittered inside its cell (so objects never touch)."""
    r = _radius(size)
    cell = size / 3
    slack = max(0, int(cell / 2 - r - 2))
    objects = []
    for group in groups:
        column = COLUMNS.index(group.column)
        for row in sorted(rng.sample(range(3), group.count)):
            cx = int(cell * (column + 0.5)) + rng.randint(-slack, slack)
            cy = int(cell * (row + 0.5)) + rng.randint(-slack, slack)
            objects.append({"shape": group.shape, "colour": group.colour, "column": group.column, "row": row,
                            "cx": cx, "cy": cy, "r": r})
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


def scene_question(kind: str, shape: str | None, scene: dict[str, Any]) -> str:
    """The instruction text of a question about a scene."""
    if kind == "total":
        return "How many shapes are there?"
    count = _groups_of(scene)[shape]["count"]
    if kind == "colour":
        return f"What colour is the {shape}?" if count == 1 else f"What colour are the {shape}s?"
    if kind == "count":
        return f"How many {shape}s are there?"
    if kind == "where":
        return f"Where is the {shape}?" if count == 1 else f"Where are the {shape}s?"
    raise ValueError(f"unknown question kind {kind!r}")


def scene_answer(kind: str, shape: str | None, scene: dict[str, Any]) -> str:
    """The exact answer to a question about a scene, from the scene's description."""
    if kind == "total":
        return NUMBER_WORDS[len(scene["objects"])]
    group = _groups_of(scene)[shape]
    if kind == "colour":
        return group["colour"]
    if kind == "count":
        return NUMBER_WORDS[group["count"]]
    if kind == "where":
        return group["column"]
    raise ValueError(f"unknown question kind {kind!r}")


def scene_caption(scene: dict[str, Any]) -> str:
    """``a red square on the left and two blue circles in the middle``: groups left to right."""
    groups = sorted(_groups_of(scene).items(), key=lambda item: COLUMNS.index(item[1]["column"]))
    parts = []
    for shape, group in groups:
        amount = "a" if group["count"] == 1 else NUMBER_WORDS[group["count"]]
        place = "in the middle" if group["column"] == "middle" else f"on the {group['column']}"
        parts.append(f"{amount} {group['colour']} {_plural(shape, group['count'])} {place}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# -------------------------------------------------------------------------------------------- clips
def _random_clip(rng: random.Random, size: int, frames: int) -> dict[str, Any]:
    r = _radius(size)
    shape, other_shape = rng.sample(SHAPES, 2)
    colour, other_colour = rng.sample(sorted(COLOURS), 2)
    direction = rng.choice(DIRECTIONS)
    margin = r + 2
    travel = rng.randint(size // 3, size - 2 * margin)  # from the first frame to the last
    start = rng.randint(margin, size - margin - travel)
    along = [start + round(travel * f / (frames - 1)) for f in range(frames)]
    if direction in ("left", "up"):
        along.reverse()
    half = size // 2
    # the moving shape keeps to one half (across its motion), the still one to the other
    moving_half, still_half = rng.sample((0, 1), 2)
    across = rng.randint(moving_half * half + margin, (moving_half + 1) * half - margin)
    still_across = rng.randint(still_half * half + margin, (still_half + 1) * half - margin)
    still_along = rng.randint(margin, size - margin)
    if direction in ("left", "right"):
        path = [[x, across] for x in along]
        still = {"cx": still_along, "cy": still_across}
    else:
        path = [[across, y] for y in along]
        still = {"cx": still_across, "cy": still_along}
    return {
        "size": size,
        "r": r,
        "moving": {"shape": shape, "colour": colour, "direction": direction, "path": path},
        "static": {"shape": other_shape, "colour": other_colour, **still},
    }


CLIP_KINDS = ("direction", "colour", "shape")


def clip_question(kind: str, clip: dict[str, Any]) -> str:
    moving = clip["moving"]
    if kind == "direction":
        return f"Which way is the {moving['colour']} {moving['shape']} moving?"
    if kind == "colour":
        return "What colour is the moving shape?"
    if kind == "shape":
        return "Which shape is moving?"
    raise ValueError(f"unknown clip question kind {kind!r}")


def clip_answer(kind: str, clip: dict[str, Any]) -> str:
    """The exact answer to a question about a clip, from its description."""
    moving = clip["moving"]
    return {"direction": moving["direction"], "colour": moving["colour"], "shape": moving["shape"]}[kind]


# ----------------------------------------------------------------------------------------- building
class _Builder:
    def __init__(self, seed: int, size: str, image_size: int):
        if size not in SIZES:
            raise VlmkitError(f"demo data size {size!r} unknown; choose one of: {', '.join(SIZES)}")
        if not 32 <= image_size <= 224:
            raise VlmkitError(f"demo data image_size {image_size}: must be between 32 and 224")
        self.seed, self.size_name, self.image_size = seed, size, image_size
        self.counts = SIZES[size]
        self.images: list[tuple[str, bytes]] = []  # (image id, PNG) in parquet order
        self.scenes: dict[str, dict[str, Any]] = {}
        self.clips: dict[str, dict[str, Any]] = {}
        self.questions: dict[str, dict[str, Any]] = {}  # instruction id -> what it asks, its context kind

    def rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(map(str, (self.seed, *parts))))

    # ---------------------------------------------------------------------------------- stills
    def add_scenes(self, split: str, count: int, paired: bool) -> list[str]:
        ids = []
        description: tuple[_Group, ...] = ()
        for n in range(count):
            family = n // 2 if paired else n
            if not paired or n % 2 == 0:
                description = _random_description(self.rng("description", split, family))
            image_id = f"{PREFIX}_IMG_{split}{n + 1:05d}"
            scene = {"split": split, "family": f"{split}{family:05d}", "size": self.image_size,
                     "objects": _layout(description, self.image_size, self.rng("layout", split, n))}
            self.scenes[image_id] = scene
            self.images.append((image_id, _png(render_scene(scene))))
            ids.append(image_id)
        return ids

    def scene_instructions(self, split: str, image_ids: list[str], prefix: str) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = {}
        for image_id in image_ids:
            scene = self.scenes[image_id]
            candidates = [("total", None)] + [
                (kind, shape) for shape in sorted(_groups_of(scene)) for kind in ("colour", "count", "where")
            ]
            rng = self.rng("questions", image_id)
            for kind, shape in sorted(rng.sample(candidates, 3), key=candidates.index):
                ins_id = f"{prefix}{len(data) + 1:05d}"
                data[ins_id] = {"instruction": scene_question(kind, shape, scene),
                                "answer": scene_answer(kind, shape, scene), "image_ids": [image_id], "rel_ins_ids": []}
                self.questions[ins_id] = {"split": split, "about": image_id, "kind": kind, "shape": shape,
                                          "in_context": NO_CONTEXT}
        return data

    def scene_contexts(self, data: dict[str, dict[str, Any]]) -> None:
        """In-context examples of training questions: a quarter none, a quarter each kind."""
        by_image: dict[str, list[str]] = {}
        by_text: dict[str, list[str]] = {}
        by_family: dict[str, list[str]] = {}
        for ins_id, ins in data.items():
            image_id = ins["image_ids"][0]
            by_image.setdefault(image_id, []).append(ins_id)
            by_text.setdefault(ins["instruction"], []).append(ins_id)
            by_family.setdefault(self.scenes[image_id]["family"], []).append(ins_id)
        for ins_id, ins in data.items():
            image_id = ins["image_ids"][0]
            rng = self.rng("context", ins_id)
            kind = rng.choice((NO_CONTEXT, SAME_IMAGE, SIMILAR_TEXT, SIMILAR_IMAGE))
            if kind == SAME_IMAGE:
                pool = [i for i in by_image[image_id] if i != ins_id]
            elif kind == SIMILAR_TEXT:
                pool = [i for i in by_text[ins["instruction"]] if data[i]["image_ids"][0] != image_id]
            elif kind == SIMILAR_IMAGE:
                pool = [i for i in by_family[self.scenes[image_id]["family"]] if data[i]["image_ids"][0] != image_id]
            else:
                pool = []
            if kind != SAME_IMAGE and len(pool) > _CONTEXT_EXAMPLES:
                pool = sorted(rng.sample(pool, _CONTEXT_EXAMPLES), key=pool.index)
            if not pool:
                kind = NO_CONTEXT
            ins["rel_ins_ids"] = pool
            self.questions[ins_id]["in_context"] = kind

    # ----------------------------------------------------------------------------------- clips
    def add_clips(self, split: str, count: int, prefix: str, contexts: bool) -> dict[str, dict[str, Any]]:
        frames = self.counts["frames"]
        data: dict[str, dict[str, Any]] = {}
        for n in range(count):
            clip_id = f"{PREFIX}_VID_{split}{n + 1:05d}"
            clip = _random_clip(self.rng("clip", split, n), self.image_size, frames)
            clip["split"] = split
            clip["frames"] = [f"{clip_id}_{f:04d}" for f in range(frames)]
            self.clips[clip_id] = clip
            for f, frame_id in enumerate(clip["frames"]):
                self.images.append((frame_id, _png(render_frame(clip, f))))
            ids = []
            for kind in CLIP_KINDS:
                ins_id = f"{prefix}{len(data) + 1:05d}"
                ids.append(ins_id)
                data[ins_id] = {"instruction": clip_question(kind, clip), "answer": clip_answer(kind, clip),
                                "image_ids": list(clip["frames"]), "rel_ins_ids": []}
                self.questions[ins_id] = {"split": split, "about": clip_id, "kind": kind, "shape": None,
                                          "in_context": NO_CONTEXT}
            if contexts:
                for ins_id in ids:
                    if self.rng("context", ins_id).random() < 0.5:
                        data[ins_id]["rel_ins_ids"] = [i for i in ids if i != ins_id]
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
            self.questions[ins_id] = {"split": "train", "about": None, "kind": "sum", "shape": None,
                                      "operands": [a, b], "in_context": NO_CONTEXT}
        return data


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
        f"size {manifest['size']}): drawn scenes of coloured shapes and clips of a moving shape, with questions whose "
        "answers are exact single words. The same seed and size always give byte-identical files.",
        "",
        "## Files",
        "",
        f"- `{FILES['images']}`: every image ({counts['images']}: {counts['train_scenes'] + counts['eval_scenes']} "
        f"scenes, {counts['frames']} clip frames), one row each: pandas index `id` (the image id), column `base64` "
        f"(URL-safe base64 of a {manifest['image_size']}x{manifest['image_size']} PNG), {counts['row_groups']} row groups.",
        f"- `{FILES['instructions']}` ({counts['train_image_instructions']} instructions): MIMIC-IT questions about "
        f"still scenes. Each is a training query in one of two train configs: `{FILES['train_config']}` (group "
        "IMAGE_TEXT: no in-context examples, or other questions about the same image) or "
        f"`{FILES['icl_train_config']}` (group IMAGE_TEXT_IN_CONTEXT: the same question about other images, or "
        "questions about other images drawn from the same scene description). `rel_ins_ids` hold the same lists.",
        f"- `{FILES['video_instructions']}` ({counts['train_video_instructions']}) and `{FILES['video_train_config']}`: "
        "questions about clips (frames are the image ids `<clip>_0000`, `<clip>_0001`, ... in time order).",
        f"- `{FILES['text_instructions']}` ({counts['text_instructions']}) and `{FILES['text_train_config']}`: "
        "text-only sums (no `image_ids`).",
        f"- `{FILES['eval_instructions']}` ({counts['eval_image_instructions']}) and "
        f"`{FILES['video_eval_instructions']}` ({counts['eval_video_instructions']}): the held-out split. Its "
        "scenes, clips and instruction ids appear in no training file.",
        f"- `{FILES['eval_types']}`: held-out instruction id -> question type (colour, count, where, total, video "
        "direction, video colour, video shape).",
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
    b = _Builder(int(seed), size, int(image_size))
    counts = b.counts

    train_scenes = b.add_scenes("train", counts["train_scenes"], paired=True)
    eval_scenes = b.add_scenes("eval", counts["eval_scenes"], paired=False)
    train = b.scene_instructions("train", train_scenes, f"{PREFIX}_INS_")
    b.scene_contexts(train)
    evaluation = b.scene_instructions("eval", eval_scenes, f"{PREFIX}_EVAL_INS_")
    video = b.add_clips("train", counts["train_clips"], f"{PREFIX}_VID_INS_", contexts=True)
    video_eval = b.add_clips("eval", counts["eval_clips"], f"{PREFIX}_VID_EVAL_INS_", contexts=False)
    text = b.text_only(counts["text"], f"{PREFIX}_TXT_INS_")

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
        "captions": len(train_scenes),
        "captions_eval": len(eval_scenes),
        "in_context": modes,
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
        f"  held-out instructions: {c['eval_image_instructions']} image, {c['eval_video_instructions']} video",
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
