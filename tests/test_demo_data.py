"""The generated demo data: real MIMIC-IT and LLaVA formats, deterministic, answers that match the
pixels, a held-out split, the cache and ``recipes data demo``.

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

from vlmkit.core.data import demo
from vlmkit.core.errors import VlmkitError

SIZE = "tiny"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
INSTRUCTION_KEYS = {"instruction", "answer", "image_ids", "rel_ins_ids"}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, name: str) -> Any:
    return json.loads((root / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("demo") / "data"
    return root, demo.write_demo_data(root, seed=0, size=SIZE)


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
                          "column": ("left", "middle", "right")[min(2, int(cx * 3 // size))]})
    return found


def answer_from_pixels(instruction: str, image: Image.Image) -> str:
    objects = blobs(image)
    if instruction == "How many shapes are there?":
        return WORDS[len(objects)]
    match = re.fullmatch(r"(What colour (?:is|are) the|How many|Where (?:is|are) the) (\w+?)s?(?: are there)?\?",
                         instruction)
    assert match, instruction
    question, shape = match.groups()
    mine = [o for o in objects if o["shape"] == shape]
    assert mine, f"no {shape} in the image for {instruction!r}"
    if question.startswith("How many"):
        return WORDS[len(mine)]
    key = "colour" if question.startswith("What colour") else "column"
    values = {o[key] for o in mine}
    assert len(values) == 1, f"{instruction!r} is ambiguous: {values}"
    return values.pop()


def caption_from_pixels(image: Image.Image) -> str:
    groups: dict[tuple[str, str, str], int] = Counter((o["shape"], o["colour"], o["column"]) for o in blobs(image))
    parts = []
    for (shape, colour, column), n in sorted(groups.items(), key=lambda g: ("left", "middle", "right").index(g[0][2])):
        where = "in the middle" if column == "middle" else f"on the {column}"
        parts.append(f"{'a' if n == 1 else WORDS[n]} {colour} {shape if n == 1 else shape + 's'} {where}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def clip_answer_from_pixels(instruction: str, frames: list[Image.Image]) -> str:
    per_frame = [blobs(f) for f in frames]
    assert all(len(b) == 2 for b in per_frame), "a clip shows one moving and one still shape"
    keyed = [{(o["shape"], o["colour"]): o for o in b} for b in per_frame]
    moving = [k for k in keyed[0] if (keyed[0][k]["cx"], keyed[0][k]["cy"]) != (keyed[-1][k]["cx"], keyed[-1][k]["cy"])]
    assert len(moving) == 1
    shape, colour = moving[0]
    dx = keyed[-1][moving[0]]["cx"] - keyed[0][moving[0]]["cx"]
    dy = keyed[-1][moving[0]]["cy"] - keyed[0][moving[0]]["cy"]
    xs = [k[moving[0]]["cx"] for k in keyed]
    ys = [k[moving[0]]["cy"] for k in keyed]
    assert (xs == sorted(xs) or xs == sorted(xs, reverse=True)) and (ys == sorted(ys) or ys == sorted(ys, reverse=True))
    if instruction == "What colour is the moving shape?":
        return colour
    if instruction == "Which shape is moving?":
        return shape
    match = re.fullmatch(r"Which way is the (\w+) (\w+) moving\?", instruction)
    assert match and match.groups() == (colour, shape), instruction
    if abs(dx) > abs(dy):
        assert dy == 0
        return "right" if dx > 0 else "left"
    assert dx == 0
    return "down" if dy > 0 else "up"


# ----------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files(written, tmp_path: Path) -> None:
    root, manifest = written
    again = demo.write_demo_data(tmp_path / "again", seed=0, size=SIZE)
    assert again == manifest
    assert files_of(tmp_path / "again") == files_of(root)
    other = demo.write_demo_data(tmp_path / "other", seed=1, size=SIZE)
    assert other["files"]["DEMO.parquet"] != manifest["files"]["DEMO.parquet"]
    assert (tmp_path / "other" / "DEMO_instructions.json").read_bytes() != (root / "DEMO_instructions.json").read_bytes()


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
                     "DEMO_EVAL_instructions.json", "DEMO_VIDEO_EVAL_instructions.json"]


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


def test_in_context_examples_of_the_three_kinds(written) -> None:
    root, manifest = written
    data = load(root, "DEMO_instructions.json")["data"]
    scenes = load(root, "DEMO_scenes.json")["scenes"]

    def description(image_id: str) -> list[tuple]:
        return sorted((o["shape"], o["colour"], o["column"]) for o in scenes[image_id]["objects"])

    kinds: Counter[str] = Counter()
    for rid, context in load(root, "DEMO_train.json").items():
        image = data[rid]["image_ids"]
        assert all(data[c]["image_ids"] == image for c in context)  # (a) same image
        kinds["same_image" if context else "none"] += 1
    for rid, context in load(root, "DEMO_ICL_train.json").items():
        image = data[rid]["image_ids"][0]
        assert context and all(data[c]["image_ids"][0] != image for c in context)
        if all(data[c]["instruction"] == data[rid]["instruction"] for c in context):
            kinds["similar_text"] += 1  # (b) the same question about other images
        else:  # (c) other images drawn from the same description
            assert all(description(data[c]["image_ids"][0]) == description(image) for c in context)
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
    assert seen_questions == {"What", "How", "Where"}
    # and what the pixels show is what the scene descriptions say was drawn
    for image_id, scene in load(root, "DEMO_scenes.json")["scenes"].items():
        found = sorted((o["shape"], o["colour"], o["column"]) for o in blobs(images[image_id]))
        assert found == sorted((o["shape"], o["colour"], o["column"]) for o in scene["objects"]), image_id


def test_clip_answers_match_the_pixels(written, images) -> None:
    root, _ = written
    directions = set()
    for name in ("DEMO_VIDEO_instructions.json", "DEMO_VIDEO_EVAL_instructions.json"):
        for rid, record in load(root, name)["data"].items():
            frames = [images[i] for i in record["image_ids"]]
            assert clip_answer_from_pixels(record["instruction"], frames) == record["answer"], rid
            if record["instruction"].startswith("Which way"):
                directions.add(record["answer"])
    assert len(directions) >= 2


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
    for name in INSTRUCTION_FILES:
        for rid, record in load(root, name)["data"].items():
            q = scenes["instructions"][rid]
            if q["kind"] == "sum":
                expected = WORDS[sum(q["operands"])]
            elif q["about"] in scenes["clips"]:
                expected = demo.clip_answer(q["kind"], scenes["clips"][q["about"]])
            else:
                objects = [o for o in scenes["scenes"][q["about"]]["objects"] if o["shape"] == q["shape"]]
                expected = {"total": WORDS[len(scenes["scenes"][q["about"]]["objects"])], "count": WORDS[len(objects)],
                            "colour": objects[0]["colour"] if objects else None,
                            "where": objects[0]["column"] if objects else None}[q["kind"]]
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


# --------------------------------------------------------------------------------------- captions
def test_captions_read_with_the_captions_reader(written, images) -> None:
    from vlmkit.core.data.llava import Captions

    root, manifest = written
    for name in ("captions.json", "captions_eval.json"):
        entries = load(root, name)
        ds = Captions(Captions.Config(path=root / name, image_folder=root / "images"))
        assert len(ds) == len(entries) == manifest["counts"][name.removesuffix(".json")]
        for i in (0, len(ds) - 1):
            record = ds[i]
            assert record.id == entries[i]["id"] and record.group == "CAPTION"
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
    assert len(list((root / "images").glob("*.png"))) == counts["train_scenes"] + counts["eval_scenes"]
    types = {e["type"] for e in manifest["recipe_data"].values()}
    assert types == {"mimicit", "captions"}
    for entry in manifest["recipe_data"].values():
        for key in ("path", "instructions", "images", "train_config", "image_folder"):
            if key in entry:
                assert (root / entry[key]).exists(), entry[key]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "type: mimicit" in readme and "type: captions" in readme and "seed 0" in readme


def test_recipe_entries_build_and_read(written) -> None:
    """Every recipe entry constructs through the registry and yields a record."""
    pytest.importorskip("vlmkit.core.data.mimicit")
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
        assert not getattr(ds, "summary", lambda: "")(), alias
        groups.add(record.group)
        if record.group == "VIDEO_TEXT":
            assert len(record.query.media) == 1 and len(record.query.media[0].frames) == 4
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
