"""The generated demo data: real MIMIC-IT and LLaVA formats, deterministic, answers that match the
pixels, a held-out split, the cache and ``recipes data demo``; and a demo that cannot be gamed:
answers not predictable from the question, at least three answers per question type held out, and
in-context examples that never give their query's answer away.

The answers are checked against what is found in the decoded images (shapes, colours, columns,
motion measured from the pixels), independently of the generator's own bookkeeping."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmkit.demo import data as demo
from vlmkit.core.errors import VlmkitError

SIZE = "tiny"
COLOURS = dict(demo.COLOURS)  # the colour words' fills
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
COLUMN_NAMES = ("left", "middle", "right")
INSTRUCTION_KEYS = {"instruction", "answer", "image_ids", "rel_ins_ids"}
SCENE_TYPES = {"colour", "count", "where", "shape"}
TYPES = SCENE_TYPES | {"video direction", "video colour", "video shape"}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, name: str) -> Any:
    return json.loads((root / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("demo") / "data"
    return root, demo.write_demo_data(root, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The size the demo recipes use (seed 0): what the held-out figures are measured on."""
    root = tmp_path_factory.mktemp("demo") / "small"
    demo.write_demo_data(root, seed=0, size="small")
    return root


@pytest.fixture(scope="module")
def images(written) -> dict[str, Image.Image]:
    """Every image of the parquet file, decoded with the URL-safe alphabet."""
    root, _ = written
    table = pq.read_table(root / "DEMO.parquet")
    out = {}
    for image_id, value in zip(table.column("id").to_pylist(), table.column("base64").to_pylist()):
        raw = base64.b64decode(value, altchars=b"-_", validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        out[image_id] = Image.open(io.BytesIO(raw)).convert("RGB")
    return out


# ------------------------------------------------------------------------------ pixel measurements
def blobs(image: Image.Image) -> list[dict[str, Any]]:
    """Connected regions of one of the demo colours: colour, shape (from how much of its bounding box
    it fills), centre, column."""
    a = np.asarray(image)
    size = a.shape[1]
    found = []
    for colour, rgb in COLOURS.items():
        mask = np.all(a == rgb, axis=-1)
        seen = np.zeros_like(mask)
        for y0, x0 in zip(*np.nonzero(mask)):
            if seen[y0, x0]:
                continue
            queue, points = deque([(y0, x0)]), []
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                points.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            ys, xs = np.array(points).T
            fill = len(points) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle" if fill > 0.4 else "?"
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            found.append({"colour": colour, "shape": shape, "cx": cx, "cy": cy,
                          "column": COLUMN_NAMES[min(2, int(cx * 3 // size))],
                          "row": min(2, int(cy * 3 // size))})
    return found


def answer_from_pixels(instruction: str, image: Image.Image) -> str:
    objects = blobs(image)
    match = re.fullmatch(r"Which shape is (?:on the (left|right)|in the (middle))\?", instruction)
    if match:
        column = match.group(1) or match.group(2)
        shapes = {o["shape"] for o in objects if o["column"] == column}
        assert len(shapes) == 1, f"{instruction!r} is ambiguous: {shapes}"
        return shapes.pop()
    match = re.fullmatch(r"(What colour are the|How many|Where are the) (\w+)s(?: are there)?\?", instruction)
    assert match, instruction
    question, shape = match.groups()
    mine = [o for o in objects if o["shape"] == shape]
    assert mine, f"no {shape} in the image for {instruction!r}"
    if question == "How many":
        return WORDS[len(mine)]
    key = "colour" if question.startswith("What colour") else "column"
    values = {o[key] for o in mine}
    assert len(values) == 1, f"{instruction!r} is ambiguous: {values}"
    return values.pop()


def caption_from_pixels(image: Image.Image) -> str:
    groups: dict[tuple[str, str, str], int] = Counter((o["shape"], o["colour"], o["column"]) for o in blobs(image))
    parts = []
    for (shape, colour, column), n in sorted(groups.items(), key=lambda g: COLUMN_NAMES.index(g[0][2])):
        where = "in the middle" if column == "middle" else f"on the {column}"
        parts.append(f"{'a' if n == 1 else WORDS[n]} {colour} {shape if n == 1 else shape + 's'} {where}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def motions_from_pixels(frames: list[Image.Image]) -> dict[tuple[str, str], str]:
    """(shape, colour) -> direction of each shape of a clip, measured from its blobs frame by frame."""
    per_frame = [blobs(f) for f in frames]
    assert all(len(b) == 2 for b in per_frame), "a clip shows two shapes that never overlap"
    keyed = [{(o["shape"], o["colour"]): o for o in b} for b in per_frame]
    assert all(set(k) == set(keyed[0]) for k in keyed)
    motions = {}
    for key in keyed[0]:
        xs, ys = [k[key]["cx"] for k in keyed], [k[key]["cy"] for k in keyed]
        assert len(set(xs)) == 1 or len(set(ys)) == 1, "a shape moves along a row or a column"
        if len(set(ys)) == 1:
            assert xs in (sorted(xs), sorted(xs, reverse=True)) and len(set(xs)) == len(xs)
            motions[key] = "right" if xs[-1] > xs[0] else "left"
        else:
            assert ys in (sorted(ys), sorted(ys, reverse=True)) and len(set(ys)) == len(ys)
            motions[key] = "down" if ys[-1] > ys[0] else "up"
    assert len(set(motions.values())) == 2, "the two shapes move in different directions"
    return motions


def clip_answer_from_pixels(instruction: str, frames: list[Image.Image]) -> str:
    motions = motions_from_pixels(frames)
    match = re.fullmatch(r"Which way is the (\w+) moving\?", instruction)
    if match:
        (direction,) = [d for (shape, _), d in motions.items() if shape == match.group(1)]
        return direction
    match = re.fullmatch(r"(What colour is the shape|Which shape is) moving (\w+)\?", instruction)
    assert match, instruction
    ((shape, colour),) = [key for key, d in motions.items() if d == match.group(2)]
    return colour if match.group(1).startswith("What colour") else shape


# ----------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files(written, tmp_path: Path) -> None:
    root, manifest = written
    again = demo.write_demo_data(tmp_path / "again", seed=0, size=SIZE)
    assert again == manifest
    assert files_of(tmp_path / "again") == files_of(root)
    other = demo.write_demo_data(tmp_path / "other", seed=1, size=SIZE)
    assert other["files"]["DEMO.parquet"] != manifest["files"]["DEMO.parquet"]
    assert (tmp_path / "other" / "DEMO_instructions.json").read_bytes() != (root / "DEMO_instructions.json").read_bytes()


def test_in_memory_data_is_the_written_data_and_grows_by_extension(written) -> None:
    """:func:`demo.build_demo` gives what is written; more scenes or clips extend a split (the
    feature probe relies on it: its first training scenes are the demo's)."""
    root, _ = written
    built = demo.build_demo(0, SIZE)
    table = pq.read_table(root / "DEMO.parquet")
    stored = dict(zip(table.column("id").to_pylist(), table.column("base64").to_pylist()))
    assert {i: base64.urlsafe_b64encode(png).decode() for i, png in built.images} == stored
    assert built.evaluation == load(root, "DEMO_EVAL_instructions.json")["data"]
    counts = demo.SIZES[SIZE]
    more = demo.build_demo(0, SIZE, counts={"eval_scenes": counts["eval_scenes"] + 6,
                                            "train_clips": counts["train_clips"] + 3})
    for image_id in built.scenes:
        assert more.scenes[image_id] == built.scenes[image_id]
    for clip_id in built.clips:
        assert more.clips[clip_id] == built.clips[clip_id]
    assert len(more.eval_scenes) == len(built.eval_scenes) + 6


# ---------------------------------------------------------------------------------------- parquet
def test_parquet_ids_base64_pngs(written, images) -> None:
    root, manifest = written
    pf = pq.ParquetFile(root / "DEMO.parquet")
    assert pf.schema_arrow.names == ["base64", "id"]
    assert pf.metadata.num_row_groups >= 3 and pf.metadata.num_row_groups == manifest["counts"]["row_groups"]
    assert pf.schema_arrow.pandas_metadata["index_columns"] == ["id"]  # pandas reads it indexed by image id
    values = pq.read_table(root / "DEMO.parquet").column("base64").to_pylist()
    assert all(set(v) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=") for v in values)
    assert any("-" in v or "_" in v for v in values)  # the URL-safe alphabet, not the standard one
    assert len(images) == manifest["counts"]["images"] == pf.metadata.num_rows
    assert all(image.size == (224, 224) for image in images.values())
    scenes = load(root, "DEMO_scenes.json")
    frames = [f for clip in scenes["clips"].values() for f in clip["frames"]]
    assert set(images) == set(scenes["scenes"]) | set(frames)
    for clip_id, clip in scenes["clips"].items():
        assert clip["frames"] == [f"{clip_id}_{i:04d}" for i in range(manifest["counts"]["frames_per_clip"])]


def test_a_smaller_image_size(tmp_path: Path) -> None:
    demo.write_demo_data(tmp_path, seed=2, size=SIZE, image_size=64)
    table = pq.read_table(tmp_path / "DEMO.parquet")
    for value in table.column("base64").to_pylist()[:5]:
        assert Image.open(io.BytesIO(base64.urlsafe_b64decode(value))).size == (64, 64)
    with pytest.raises(VlmkitError, match="image_size"):
        demo.write_demo_data(tmp_path / "x", image_size=512)
    with pytest.raises(VlmkitError, match="size 'huge'"):
        demo.write_demo_data(tmp_path / "x", size="huge")


# ----------------------------------------------------------------------------------- instructions
INSTRUCTION_FILES = ["DEMO_instructions.json", "DEMO_VIDEO_instructions.json", "DEMO_TEXT_instructions.json",
                     "DEMO_EVAL_instructions.json", "DEMO_VIDEO_EVAL_instructions.json", "DEMO_ICL_EVAL_instructions.json"]


@pytest.mark.parametrize("name", INSTRUCTION_FILES)
def test_instructions_json_is_mimicit(written, images, name: str) -> None:
    root, _ = written
    raw = load(root, name)
    assert set(raw) == {"meta", "data"} and isinstance(raw["meta"], dict)
    data = raw["data"]
    assert data and all(isinstance(k, str) for k in data)
    for rid, record in data.items():
        text_only = name == "DEMO_TEXT_instructions.json"
        assert set(record) == (INSTRUCTION_KEYS - {"image_ids"} if text_only else INSTRUCTION_KEYS), rid
        assert isinstance(record["instruction"], str) and record["instruction"]
        assert isinstance(record["answer"], str) and record["answer"] and " " not in record["answer"]
        assert all(cid in data and cid != rid for cid in record["rel_ins_ids"])
        if not text_only:
            assert record["image_ids"] and all(i in images for i in record["image_ids"])
        if "VIDEO" in name:
            assert len(record["image_ids"]) == 4 and all(re.search(r"_\d{4}$", i) for i in record["image_ids"])
        elif not text_only:
            assert len(record["image_ids"]) == 1 and not re.search(r"_\d{4}$", record["image_ids"][0])


def test_train_configs(written) -> None:
    root, _ = written
    images_data = load(root, "DEMO_instructions.json")["data"]
    plain, icl = load(root, "DEMO_train.json"), load(root, "DEMO_ICL_train.json")
    assert not set(plain) & set(icl) and set(plain) | set(icl) == set(images_data)
    for config, data in ((plain, images_data), (icl, images_data),
                         (load(root, "DEMO_VIDEO_train.json"), load(root, "DEMO_VIDEO_instructions.json")["data"]),
                         (load(root, "DEMO_TEXT_train.json"), load(root, "DEMO_TEXT_instructions.json")["data"])):
        for rid, context in config.items():
            assert rid in data and context == data[rid]["rel_ins_ids"]
            assert all(cid in data and cid != rid for cid in context)


def layout_of(scene: dict[str, Any]) -> tuple[str, ...]:
    """The shapes left to right."""
    return tuple(sorted({(COLUMN_NAMES.index(o["column"]), o["shape"]) for o in scene["objects"]}))


def test_in_context_examples_of_the_three_kinds(written) -> None:
    root, manifest = written
    data = load(root, "DEMO_instructions.json")["data"]
    described = load(root, "DEMO_scenes.json")
    scenes, asks = described["scenes"], described["instructions"]

    kinds: Counter[str] = Counter()
    for rid, context in load(root, "DEMO_train.json").items():
        image = data[rid]["image_ids"]
        assert all(data[c]["image_ids"] == image for c in context)  # (a) same image
        kinds["same_image" if context else "none"] += 1
    for rid, context in load(root, "DEMO_ICL_train.json").items():
        image = data[rid]["image_ids"][0]
        assert context and all(data[c]["image_ids"][0] != image for c in context)
        assert len(context) == 3
        layouts = {layout_of(scenes[data[c]["image_ids"][0]]) for c in context}
        families = {scenes[data[c]["image_ids"][0]]["family"] for c in context}
        if all(asks[c]["kind"] == asks[rid]["kind"] for c in context):
            # (b) a question of the same type about another target, in images of other families
            assert scenes[image]["family"] not in families
            kinds["similar_text"] += 1
        else:  # (c) colour and count questions about other images of the same layout (family)
            assert families == {scenes[image]["family"]} and layouts == {layout_of(scenes[image])}
            assert {asks[c]["kind"] for c in context} <= {"colour", "count"}
            kinds["similar_image"] += 1
    assert all(kinds[k] > 0 for k in ("none", "same_image", "similar_text", "similar_image")), kinds
    assert dict(kinds) == {k: v for k, v in manifest["counts"]["in_context"].items() if v}
    video = load(root, "DEMO_VIDEO_instructions.json")["data"]
    same_clip = [rid for rid, ctx in load(root, "DEMO_VIDEO_train.json").items() if ctx]
    assert same_clip and all(video[c]["image_ids"] == video[r]["image_ids"] for r in same_clip
                             for c in video[r]["rel_ins_ids"])


# ---------------------------------------------------------------------------------------- answers
def test_scene_answers_match_the_pixels(written, images) -> None:
    root, _ = written
    seen_questions = set()
    for name in ("DEMO_instructions.json", "DEMO_EVAL_instructions.json"):
        for rid, record in load(root, name)["data"].items():
            image = images[record["image_ids"][0]]
            assert answer_from_pixels(record["instruction"], image) == record["answer"], rid
            seen_questions.add(record["instruction"].split()[0])
    assert seen_questions == {"What", "How", "Where", "Which"}
    # and what the pixels show is what the scene descriptions say was drawn
    for image_id, scene in load(root, "DEMO_scenes.json")["scenes"].items():
        found = sorted((o["shape"], o["colour"], o["column"], o["row"]) for o in blobs(images[image_id]))
        assert found == sorted((o["shape"], o["colour"], o["column"], o["row"]) for o in scene["objects"]), image_id


def test_every_scene_shows_three_groups_filling_their_columns_from_the_top(written, images) -> None:
    """Circles, squares and triangles, one group per column, each of one colour and one to three
    objects in the top rows of its column: the count is how far down the column reaches."""
    root, _ = written
    layouts = Counter()
    for image_id in load(root, "DEMO_scenes.json")["scenes"]:
        found = blobs(images[image_id])
        by_column = {c: [o for o in found if o["column"] == c] for c in COLUMN_NAMES}
        assert all(1 <= len(v) <= 3 for v in by_column.values()), image_id
        assert all(len({(o["shape"], o["colour"]) for o in v}) == 1 for v in by_column.values()), image_id
        assert all(sorted(o["row"] for o in v) == list(range(len(v))) for v in by_column.values()), image_id
        layout = tuple(v[0]["shape"] for v in by_column.values())
        assert sorted(layout) == ["circle", "square", "triangle"]
        layouts[layout] += 1
    assert len(layouts) == 6  # every order of the three shapes


def test_clip_answers_match_the_pixels(written, images) -> None:
    root, _ = written
    answers: dict[str, set[str]] = {}
    for name in ("DEMO_VIDEO_instructions.json", "DEMO_VIDEO_EVAL_instructions.json"):
        for rid, record in load(root, name)["data"].items():
            frames = [images[i] for i in record["image_ids"]]
            assert clip_answer_from_pixels(record["instruction"], frames) == record["answer"], rid
            answers.setdefault(record["instruction"].split()[1], set()).add(record["answer"])
    assert set(answers) == {"way", "colour", "shape"}
    assert all(len(v) >= 2 for v in answers.values()), answers


def test_text_only_answers(written) -> None:
    root, _ = written
    for record in load(root, "DEMO_TEXT_instructions.json")["data"].values():
        a, b = re.fullmatch(r"What is (\w+) plus (\w+)\?", record["instruction"]).groups()
        assert record["answer"] == WORDS[WORDS.index(a) + WORDS.index(b)]


def test_answers_follow_the_scene_descriptions(written) -> None:
    """The descriptions in DEMO_scenes.json say what was drawn: re-rendering them gives the
    stored images, and re-deriving every answer from them gives the stored answer."""
    root, _ = written
    scenes = load(root, "DEMO_scenes.json")
    table = pq.read_table(root / "DEMO.parquet")
    stored = dict(zip(table.column("id").to_pylist(), table.column("base64").to_pylist()))
    for image_id, scene in list(scenes["scenes"].items())[:6]:
        drawn = np.asarray(demo.render_scene(scene))
        np.testing.assert_array_equal(drawn, np.asarray(Image.open(io.BytesIO(base64.urlsafe_b64decode(stored[image_id])))))
    for clip in list(scenes["clips"].values())[:2]:
        for f, frame_id in enumerate(clip["frames"]):
            stored_frame = Image.open(io.BytesIO(base64.urlsafe_b64decode(stored[frame_id])))
            np.testing.assert_array_equal(np.asarray(demo.render_frame(clip, f)), np.asarray(stored_frame))
    for name in INSTRUCTION_FILES:
        for rid, record in load(root, name)["data"].items():
            q = scenes["instructions"][rid]
            if q["kind"] == "sum":
                expected = WORDS[sum(q["operands"])]
            elif q["about"] in scenes["clips"]:
                shapes = scenes["clips"][q["about"]]["objects"]
                if q["kind"] == "direction":
                    (expected,) = [o["direction"] for o in shapes if o["shape"] == q["target"]]
                else:
                    (expected,) = [o[q["kind"]] for o in shapes if o["direction"] == q["target"]]
            elif q["kind"] == "shape":
                objects = scenes["scenes"][q["about"]]["objects"]
                (expected,) = {o["shape"] for o in objects if o["column"] == q["target"]}
            else:
                objects = [o for o in scenes["scenes"][q["about"]]["objects"] if o["shape"] == q["target"]]
                expected = {"count": WORDS[len(objects)], "colour": objects[0]["colour"],
                            "where": objects[0]["column"]}[q["kind"]]
            assert record["answer"] == expected, rid


# -------------------------------------------------------------------------------------- held out
def test_held_out_split_is_disjoint_from_training(written) -> None:
    root, _ = written
    train_files = ["DEMO_instructions.json", "DEMO_VIDEO_instructions.json", "DEMO_TEXT_instructions.json"]
    train = {rid: r for name in train_files for rid, r in load(root, name)["data"].items()}
    held = {rid: r for name in ("DEMO_EVAL_instructions.json", "DEMO_VIDEO_EVAL_instructions.json")
            for rid, r in load(root, name)["data"].items()}
    assert held and not set(train) & set(held)
    configs = [load(root, n) for n in ("DEMO_train.json", "DEMO_ICL_train.json", "DEMO_VIDEO_train.json",
                                       "DEMO_TEXT_train.json")]
    used = {rid for c in configs for rid, ctx in c.items() for rid in (rid, *ctx)}
    assert not used & set(held)
    train_images = {i for r in train.values() for i in r.get("image_ids", [])}
    train_images |= {c["id"] for c in load(root, "captions.json")}
    held_images = {i for r in held.values() for i in r["image_ids"]}
    assert not train_images & held_images
    assert {c["id"] for c in load(root, "captions_eval.json")} <= held_images
    scenes = load(root, "DEMO_scenes.json")["scenes"]

    def looks(image_id: str) -> list[tuple]:
        return sorted((o["shape"], o["colour"], o["column"], o["row"]) for o in scenes[image_id]["objects"])

    seen = {str(looks(i)) for i in scenes if i in train_images}
    assert not any(str(looks(i)) in seen for i in scenes if i in held_images)  # no held-out scene is a training one


# ------------------------------------------------------------------ held out, with in-context examples
def test_held_out_in_context_files(written, small) -> None:
    """DEMO_ICL_EVAL: the held-out stills again (same order, scenes, questions and answers, and the
    same number in the id), each a query of the train config with examples as the training ICL
    config gives them: copies of training instructions, in the same instructions file."""
    for root in (written[0], small):
        raw = load(root, "DEMO_ICL_EVAL_instructions.json")
        assert raw["meta"]["group"] == "IMAGE_TEXT_IN_CONTEXT" and raw["meta"]["split"] == "eval"
        data, config = raw["data"], load(root, "DEMO_ICL_EVAL_train.json")
        held, train = load(root, "DEMO_EVAL_instructions.json")["data"], load(root, "DEMO_instructions.json")["data"]
        asks = load(root, "DEMO_scenes.json")["instructions"]
        assert list(config) == [rid.replace("DEMO_EVAL_INS_", "DEMO_ICL_EVAL_INS_") for rid in held]
        assert [asks[q]["copy_of"] for q in config] == list(held)
        examples = [rid for rid in data if rid not in config]
        assert list(data) == list(config) + examples and all(e.startswith("DEMO_ICL_EVAL_EX_") for e in examples)
        assert {e for context in config.values() for e in context} == set(examples)  # no unused example
        types, held_types = load(root, "DEMO_ICL_EVAL_types.json"), load(root, "DEMO_EVAL_types.json")
        assert list(types) == list(config) and all(types[q] == held_types[asks[q]["copy_of"]] for q in config)
        for q, context in config.items():
            original = held[asks[q]["copy_of"]]
            assert {k: data[q][k] for k in ("instruction", "answer", "image_ids")} == \
                {k: original[k] for k in ("instruction", "answer", "image_ids")}
            assert data[q]["rel_ins_ids"] == context and len(context) >= 1  # every query has an example
            assert asks[q]["in_context"] in ("similar_text", "similar_image")
        for e in examples:  # a training instruction, copied without examples of its own
            source = asks[e]["copy_of"]
            assert data[e] == {**train[source], "rel_ins_ids": []} and asks[e]["split"] == "train"
            assert {k: v for k, v in asks[e].items() if k not in ("copy_of", "in_context")} == \
                {k: v for k, v in asks[source].items() if k != "in_context"}
    # the demo's size: three examples each, the two kinds of the training ICL config half each, as there
    config = load(small, "DEMO_ICL_EVAL_train.json")
    asks = load(small, "DEMO_scenes.json")["instructions"]
    assert len(config) == 160 and Counter(len(c) for c in config.values()) == {3: 160}
    assert Counter(len(c) for c in load(small, "DEMO_ICL_train.json").values()) == {3: 400}
    assert Counter(asks[q]["in_context"] for q in config) == {"similar_text": 80, "similar_image": 80}
    assert Counter(asks[q]["in_context"] for q in load(small, "DEMO_ICL_train.json")) == \
        {"similar_text": 200, "similar_image": 200}


def held_out_in_context_pairs(root: Path) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(query id, example id, query record, example record) for every example of DEMO_ICL_EVAL."""
    data = load(root, "DEMO_ICL_EVAL_instructions.json")["data"]
    return [(q, e, data[q], data[e]) for q, context in load(root, "DEMO_ICL_EVAL_train.json").items() for e in context]


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_no_held_out_in_context_example_gives_its_query_s_answer_away(written, small, which: str) -> None:
    root = written[0] if which == "tiny" else small
    described = load(root, "DEMO_scenes.json")
    asks, scenes = described["instructions"], described["scenes"]
    pairs = held_out_in_context_pairs(root)
    leaks = [(q, e) for q, e, query, example in pairs
             if (example["instruction"], example["answer"]) == (query["instruction"], query["answer"])]
    assert leaks == [] and len(pairs) >= len(load(root, "DEMO_ICL_EVAL_train.json"))
    # the generator's leak rule, the one the training configs keep
    assert [(q, e) for q, e, query, example in pairs
            if not demo.context_allowed(asks[q], asks[e], query["instruction"], example["instruction"])] == []
    for q, e, query, example in pairs:
        assert example["instruction"] != query["instruction"], (q, e)
        assert scenes[example["image_ids"][0]]["split"] == "train", (q, e)  # only the query is held out
        layout = layout_of(scenes[query["image_ids"][0]]) == layout_of(scenes[example["image_ids"][0]])
        if asks[q]["in_context"] == "similar_image":  # chosen for the query's layout: never about the layout
            assert layout and asks[e]["kind"] in ("colour", "count"), (q, e)
            assert scenes[example["image_ids"][0]]["family"] == asks[q]["similar_family"], (q, e)
        else:  # chosen by type alone: any training scene, whatever its layout
            assert asks[e]["kind"] == asks[q]["kind"] and asks[e]["target"] != asks[q]["target"], (q, e)
    # and the rule refuses what would leak: a layout question about the family chosen for the layout
    query = next(asks[q] for q, *_ in pairs if asks[q]["in_context"] == "similar_image"
                 and asks[q]["kind"] in ("where", "shape")) if which == "small" else None
    if query is not None:
        same_family = next(a for a in asks.values() if a.get("family") == query["similar_family"]
                           and a["kind"] in ("where", "shape") and a["split"] == "train")
        assert not demo.context_allowed(query, same_family, "query", "example")
    if which == "small":  # copying the examples' most frequent answer is no better than a guess
        right = tried = 0
        answers = {kind: {r["answer"] for rid, r in load(root, "DEMO_instructions.json")["data"].items()
                          if asks[rid]["kind"] == kind} for kind in SCENE_TYPES}
        by_query: dict[str, list[str]] = {}
        for q, _e, query, example in pairs:
            if example["answer"] in answers[asks[q]["kind"]]:
                by_query.setdefault(q, []).append(example["answer"])
        data = load(root, "DEMO_ICL_EVAL_instructions.json")["data"]
        for q, usable in by_query.items():
            tried += 1
            right += Counter(usable).most_common(1)[0][0] == data[q]["answer"]
        assert tried > 100 and right / tried <= 0.4, (right, tried)


#: version 4 of the demo data (seed 0, size small): the sha256 of each JSON file, and of the images'
#: ids and decoded pixels (:func:`version_4_digests`); version 5 only added files
VERSION_4 = {
    "DEMO_instructions.json": "cb445651493078069832a73866bef743c06c0a4771a0e282689a05637a97242b",
    "DEMO_train.json": "bd3e0c9cd94b1c63c64a3ffc7120307ee35ef19466524a620cb4ba7e3aa7f9c5",
    "DEMO_ICL_train.json": "a969f38731b42113df6675776274633b5056581f3cefc9c4b3b37b45a7d3cfd1",
    "DEMO_VIDEO_instructions.json": "f85a394c401948b0b1e1beda033b94823937fcf3a6888ec74a0247d4dead0511",
    "DEMO_VIDEO_train.json": "255410d4d1a3db7b86740da51df9dccdd65b8382551ce9f29c4c35c0e2d0c090",
    "DEMO_TEXT_instructions.json": "8bc13382b9823d9e7224f9c061cb58dd4e502ce61a1ccc660d5cdca9fb73aeeb",
    "DEMO_TEXT_train.json": "97fe0bdef2b6219ce41c889e6b3129338b8c7bb95118b41665caf5541b3a5c99",
    "DEMO_EVAL_instructions.json": "a10b91ebba5fff54e338463bf440bbf48080dc36915df4f16d2e4ca0f4886037",
    "DEMO_VIDEO_EVAL_instructions.json": "58c93d9fc3d9cca8ff5a1d5378487025d43ab7e5147d0eae0cdafacf8f6f6ada",
    "DEMO_EVAL_types.json": "0ec587c73ceec3829f1264530e3fafd983ed3d89be05cc9a26d772ed8d2b7440",
    "captions.json": "3585c6113e89133e6510c6a4d2ed32c8ecb2f8f59b79ae5febcf964c10354df6",
    "captions_eval.json": "d1efefe661dcc5c65aedb17803eecce22bdd5a33c4de46e20252e67443a451cc",
    "DEMO_scenes.json": "4c50952a0be7f1a407b4bd38119f7905a1b0c4dc66a5db99a8ce1eded9a631ca",
    "DEMO.parquet": "20cb525fcef0ea7c0c494bb8d201afb3086d29758fc7c5a60e54b32cf4604a05",
    "images/": "763c4b69bb1f25f0921a2d01ca91069933bc3f65c8df19d8d18f85c569f5da03",
}


def version_4_digests(root: Path) -> dict[str, str]:
    """What each file of version 4 holds, with the version number in its metadata read as 4: the
    sha256 of each JSON file (of DEMO_scenes.json, of what version 4 described: the instructions
    without the DEMO_ICL_EVAL ones), of the parquet file's row groups, ids and decoded pixels (PNG
    bytes depend on the zlib build), and of the PNG folder's names (each file the parquet's PNG)."""
    stamp = f"vlmkit-demo-{demo.DEMO_VERSION}".encode()
    out = {name: hashlib.sha256((root / name).read_bytes().replace(stamp, b"vlmkit-demo-4")).hexdigest()
           for name in VERSION_4 if name.endswith(".json") and name != "DEMO_scenes.json"}
    described = load(root, "DEMO_scenes.json")
    described["version"] = 4
    described["instructions"] = {k: v for k, v in described["instructions"].items() if not k.startswith("DEMO_ICL_EVAL_")}
    out["DEMO_scenes.json"] = hashlib.sha256((json.dumps(described, indent=1, ensure_ascii=False) + "\n").encode()).hexdigest()
    table = pq.read_table(root / "DEMO.parquet")
    pixels = hashlib.sha256(str(pq.ParquetFile(root / "DEMO.parquet").metadata.num_row_groups).encode())
    for image_id, value in zip(table.column("id").to_pylist(), table.column("base64").to_pylist()):
        png = base64.urlsafe_b64decode(value)
        pixels.update(image_id.encode() + np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).tobytes())
        if (root / "images" / f"{image_id}.png").exists():
            assert (root / "images" / f"{image_id}.png").read_bytes() == png
    out["DEMO.parquet"] = pixels.hexdigest()
    out["images/"] = hashlib.sha256(" ".join(sorted(p.name for p in (root / "images").iterdir())).encode()).hexdigest()
    return out


def test_the_files_of_version_4_are_unchanged(small) -> None:
    """The held-out in-context files were added without changing any training or held-out data:
    the demo's figures of version 4 hold for version 5 (its files differ only in the version number)."""
    assert version_4_digests(small) == VERSION_4
    instructions = (small / "DEMO_instructions.json").read_text(encoding="utf-8")
    assert f'"version": "vlmkit-demo-{demo.DEMO_VERSION}"' in instructions and demo.DEMO_VERSION >= 5


# ------------------------------------------------------------------------------ not gameable
def in_context_pairs(root: Path) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(query id, example id, query record, example record) for every in-context example of every
    train config."""
    pairs = []
    for instructions, configs in (("DEMO_instructions.json", ("DEMO_train.json", "DEMO_ICL_train.json")),
                                  ("DEMO_VIDEO_instructions.json", ("DEMO_VIDEO_train.json",))):
        data = load(root, instructions)["data"]
        for config in configs:
            for rid, context in load(root, config).items():
                pairs += [(rid, c, data[rid], data[c]) for c in context]
    return pairs


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_no_in_context_example_gives_its_query_s_answer_away(written, small, which: str) -> None:
    root = written[0] if which == "tiny" else small
    pairs = in_context_pairs(root)
    asks = load(root, "DEMO_scenes.json")["instructions"]
    scenes = load(root, "DEMO_scenes.json")["scenes"]
    assert len({q for q, *_ in pairs}) > (40 if which == "small" else 10)
    # the leak count: an example asking the query's question with the query's answer
    leaks = [(q, e) for q, e, query, example in pairs
             if (example["instruction"], example["answer"]) == (query["instruction"], query["answer"])]
    assert leaks == []
    # no example asks the query's question at all, nor the same type about the same image or clip
    assert not [(q, e) for q, e, query, example in pairs if example["instruction"] == query["instruction"]]
    assert not [(q, e) for q, e, *_ in pairs
                if (asks[q]["kind"], asks[q]["about"]) == (asks[e]["kind"], asks[e]["about"])]
    for q, e, query, example in pairs:
        kinds = (asks[q]["kind"], asks[e]["kind"])
        if q.startswith("DEMO_VID"):
            # a clip's direction question names a shape and tells where it moves: never with the others
            assert set(kinds) == {"colour", "shape"}, (q, e)
            continue
        # the columns of the shapes are a permutation: about an image chosen for having the
        # query's layout (itself, or another of its family), one tells of another
        family = scenes[query["image_ids"][0]]["family"] == scenes[example["image_ids"][0]]["family"]
        if family:
            assert not set(kinds) <= {"where", "shape"}, (q, e)


def test_copying_an_example_s_answer_is_no_better_than_chance(small) -> None:
    """Answering an in-context query with the answer its examples give most often (among those that
    answer the query's type) is right about as often as a guess, not more."""
    asks = load(small, "DEMO_scenes.json")["instructions"]
    by_kind: dict[str, set[str]] = {}
    for rid, q in asks.items():
        if q["kind"] != "sum":
            by_kind.setdefault(("video " if q.get("clip") else "") + q["kind"], set())
    data = {**load(small, "DEMO_instructions.json")["data"], **load(small, "DEMO_VIDEO_instructions.json")["data"]}
    for rid, record in data.items():
        by_kind[("video " if asks[rid].get("clip") else "") + asks[rid]["kind"]].add(record["answer"])
    examples: dict[str, list[str]] = {}
    for q, _e, query, example in in_context_pairs(small):
        examples.setdefault(q, []).append(example["answer"])
    right = tried = 0
    for q, answers in examples.items():
        kind = ("video " if asks[q].get("clip") else "") + asks[q]["kind"]
        usable = [a for a in answers if a in by_kind[kind]]
        if usable:
            tried += 1
            right += Counter(usable).most_common(1)[0][0] == data[q]["answer"]
    assert tried > 200
    assert right / tried <= 0.4, (right, tried)


def test_held_out_answers_are_spread_and_not_predictable_from_the_question(small) -> None:
    """Per type at least three answers held out, none more than 45% of them, and a model that
    answers from the question alone (each question's most frequent training answer: blind, or
    with shuffled images) right at most 45% of the time."""
    types = load(small, "DEMO_EVAL_types.json")
    held = {**load(small, "DEMO_EVAL_instructions.json")["data"],
            **load(small, "DEMO_VIDEO_EVAL_instructions.json")["data"]}
    assert set(types) == set(held) and set(types.values()) == TYPES  # "total" is gone, "shape" is asked
    answers: dict[str, Counter[str]] = {}
    for rid, record in held.items():
        answers.setdefault(types[rid], Counter())[record["answer"]] += 1
    for kind, counts in answers.items():
        assert len(counts) >= 3, (kind, counts)
        assert max(counts.values()) / sum(counts.values()) <= 0.45, (kind, counts)
    assert all(sum(answers[k].values()) >= 12 for k in TYPES)
    train = {**load(small, "DEMO_instructions.json")["data"], **load(small, "DEMO_VIDEO_instructions.json")["data"]}
    seen: dict[str, Counter[str]] = {}
    for record in train.values():
        seen.setdefault(record["instruction"], Counter())[record["answer"]] += 1
    blind = Counter()
    for rid, record in held.items():
        guess = seen[record["instruction"]].most_common(1)[0][0]  # every held-out question is asked in training
        blind[types[rid]] += guess == record["answer"]
    assert sum(blind.values()) / len(held) <= 0.45, blind
    per_type_majority = sum(max(c.values()) for c in answers.values()) / len(held)
    assert per_type_majority <= 0.45


def test_questions_are_worded_alike_whatever_the_scene(small) -> None:
    """A question's words do not depend on the answer: the same few questions for every scene
    (plural even for one object), every target asked about alike."""
    asks = load(small, "DEMO_scenes.json")["instructions"]
    texts: dict[str, set[str]] = {}
    targets: dict[str, Counter[str]] = {}
    for name in ("DEMO_instructions.json", "DEMO_VIDEO_instructions.json"):
        for rid, record in load(small, name)["data"].items():
            kind = ("video " if asks[rid].get("clip") else "") + asks[rid]["kind"]
            texts.setdefault(kind, set()).add(record["instruction"])
            targets.setdefault(kind, Counter())[asks[rid]["target"]] += 1
    assert {k: len(v) for k, v in texts.items()} == {
        "colour": 3, "count": 3, "where": 3, "shape": 3, "video direction": 3, "video colour": 4, "video shape": 4}
    for kind, counts in targets.items():
        assert min(counts.values()) / max(counts.values()) > 0.35, (kind, counts)


# --------------------------------------------------------------------------------------- captions
def test_captions_read_with_the_captions_reader(written, images) -> None:
    from vlmkit.datasets.llava import Captions

    root, manifest = written
    for name in ("captions.json", "captions_eval.json"):
        entries = load(root, name)
        ds = Captions(Captions.Config(path=root / name, image_folder=root / "images"))
        assert len(ds) == len(entries) == manifest["counts"][name.removesuffix(".json")]
        for i in (0, len(ds) - 1):
            record = ds[i]
            assert record.id == entries[i]["id"] and record.context == []
            image = images[entries[i]["id"]]
            np.testing.assert_array_equal(np.asarray(record.query.media[0].frames[0]), np.asarray(image))
            assert record.query.turns[1].text == entries[i]["caption"] == caption_from_pixels(image)
        assert all(e["caption"] == caption_from_pixels(images[e["id"]]) for e in entries)


# --------------------------------------------------------------------------------------- manifest
def test_manifest_and_readme(written) -> None:
    root, manifest = written
    assert load(root, "manifest.json") == manifest
    assert manifest["seed"] == 0 and manifest["size"] == SIZE and manifest["version"] == demo.DEMO_VERSION
    for name, digest in manifest["files"].items():
        if name.endswith("/"):
            assert (root / name).is_dir()
        else:
            assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest
    counts = manifest["counts"]
    assert counts["train_image_instructions"] == len(load(root, "DEMO_instructions.json")["data"])
    assert counts["eval_video_instructions"] == len(load(root, "DEMO_VIDEO_EVAL_instructions.json")["data"])
    assert counts["eval_in_context_queries"] == len(load(root, "DEMO_ICL_EVAL_train.json"))
    assert counts["eval_in_context_queries"] + counts["eval_in_context_examples"] == \
        len(load(root, "DEMO_ICL_EVAL_instructions.json")["data"])
    assert sum(counts["eval_in_context"].values()) == counts["eval_in_context_queries"]
    assert {"DEMO_ICL_EVAL_instructions.json", "DEMO_ICL_EVAL_train.json", "DEMO_ICL_EVAL_types.json"} <= set(manifest["files"])
    assert len(list((root / "images").glob("*.png"))) == counts["train_scenes"] + counts["eval_scenes"]
    types = {e["type"] for e in manifest["recipe_data"].values()}
    assert types == {"mimicit", "captions"}
    for entry in manifest["recipe_data"].values():
        for key in ("path", "instructions", "images", "train_config", "image_folder"):
            if key in entry:
                assert (root / entry[key]).exists(), entry[key]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "type: mimicit" in readme and "type: captions" in readme and "seed 0" in readme
    assert "`DEMO_ICL_EVAL_instructions.json` (" in readme and "demo_eval_in_context:" in readme


def test_recipe_entries_build_and_read(written) -> None:
    """Every recipe entry constructs through the registry and yields a record."""
    pytest.importorskip("vlmkit.datasets.mimicit")
    from vlmkit.core.registry import get_registry

    root, _ = written
    registry = get_registry()
    groups = set()
    for alias, entry in demo.recipe_data(root, frames=4).items():
        options = {k: v for k, v in entry.items() if k not in ("type", "template")}
        cls = registry.component_class("dataset", entry["type"])
        ds = cls(cls.Config(**options))
        record = ds[0]
        assert record.query.turns[-1].role == "assistant" and record.query.turns[-1].text, alias
        assert ds.summary() == "" and ds.error_report() == {}, alias
        group = entry.get("group", "CAPTION")  # what the entry asks of the dataset: captions, or a MIMIC-IT group
        groups.add(group)
        if group == "VIDEO_TEXT":
            assert len(record.query.media) == 1 and len(record.query.media[0].frames) == 4
        if group == "TEXT_ONLY":
            assert record.query.media == []
        if alias == "demo_eval_in_context":  # a held-out query after three training examples, each with its image
            assert record.query.media[0].id.startswith("DEMO_IMG_eval") and len(record.context) == 3
            assert all(len(ex.media) == 1 and ex.media[0].id.startswith("DEMO_IMG_train") for ex in record.context)
            assert all(ex.turns[-1].role == "assistant" and ex.turns[-1].text for ex in record.context)
            assert len(ds) == len(load(root, "DEMO_ICL_EVAL_train.json"))
    assert groups == {"CAPTION", "IMAGE_TEXT", "IMAGE_TEXT_IN_CONTEXT", "VIDEO_TEXT", "TEXT_ONLY"}


# ------------------------------------------------------------------------------------------ cache
def test_demo_data_dir_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path / "cache"))
    path = demo.demo_data_dir(5, size=SIZE)
    assert path == tmp_path / "cache" / f"demo-{demo.DEMO_VERSION}-5-{SIZE}"
    assert load(path, "manifest.json")["seed"] == 5
    before = files_of(path)

    def no_second_write(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached copy must be reused")

    monkeypatch.setattr(demo, "write_demo_data", no_second_write)
    assert demo.demo_data_dir(5, size=SIZE) == path
    assert files_of(path) == before
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]  # no temporary folder left


def test_demo_data_dir_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path / "cache"))

    def broken(out: Path, **kwargs: Any) -> None:
        (Path(out) / "half.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(demo, "write_demo_data", broken)
    with pytest.raises(OSError, match="disk full"):
        demo.demo_data_dir(0)
    assert list((tmp_path / "cache").iterdir()) == []


# -------------------------------------------------------------------------------------------- CLI
def test_cli_data_demo(written, tmp_path: Path) -> None:
    root, manifest = written
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "vlmkit.core.cli", "data", "demo", "--out", str(out), "--seed", "0", "--size", SIZE],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"seed 0, size {SIZE}" in result.stdout
    assert f"images: {manifest['counts']['images']} in DEMO.parquet" in result.stdout
    assert "type: mimicit" in result.stdout and f"instructions: {out.resolve() / 'DEMO_instructions.json'}" in result.stdout
    assert files_of(out) == files_of(root)  # another process, the same bytes

    bad = subprocess.run([sys.executable, "-m", "vlmkit.core.cli", "data", "demo", "--size", "huge"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_recipe_entries_validate_in_a_recipe(written, tmp_path: Path) -> None:
    """The printed ``data:`` entries are valid recipe entries (types, templates, options)."""
    import yaml

    from vlmkit.core.recipe.loader import load_recipe, shipped_recipes

    root, _ = written
    recipe = yaml.safe_load(shipped_recipes()["toy_prefix"].read_text(encoding="utf-8"))
    recipe.update(yaml.safe_load(demo.recipe_snippet(root.resolve(), frames=4)))
    recipe["stages"][0]["data"] = ["demo_captions"]
    recipe["stages"][1]["data"] = ["demo_images", "demo_in_context", "demo_video", "demo_text"]
    path = tmp_path / "demo_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    resolved = load_recipe(str(path))
    assert set(resolved.datasets) == set(demo.recipe_data())
