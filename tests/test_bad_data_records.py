"""Bad records are bad records: text that is not valid Unicode, a decompression-bomb image, an image
path outside the image folder, a missing data file. Each is handled under the dataset's
``on_error`` policy (or is a clear error naming the recipe field), never a traceback."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tiny import toy_mapping, write_recipe
from vlmkit.core.cli import main
from vlmkit.datasets.llava import Captions, LlavaConversations, TextOnly
from vlmkit.datasets.mimicit import MimicIT
from vlmkit.core.errors import VlmkitError
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import get_registry


def build_dataset(registry: Any, alias: str, spec: Any) -> Any:
    from vlmkit.core.data.build import build_dataset as build

    return build(registry, alias, spec)

SURROGATE = "\ud800"  # a lone surrogate: JSON's "\ud800" escape reads as it; no tokenizer or UTF-8 file takes it


# ------------------------------------------------------------------------------------------ helpers
def write_png(path: Path, seed: int, size: int = 16) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB").save(path)
    return path


def write_bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header claims ``width`` x ``height`` 1-bit pixels (400 megapixels: over twice
    PIL's MAX_IMAGE_PIXELS); a few dozen bytes on disk, nothing of that size is ever allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00"))
                     + chunk(b"IEND", b""))
    return path


def write_json(path: Path, entries: list[Any]) -> Path:
    # ensure_ascii (the default) writes the surrogate as the escape "\ud800", as a real file would hold it
    path.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return path


def captions(path: Path, **options: Any) -> Captions:
    return Captions(Captions.Config(path=path, **options))


def caption_files(tmp_path: Path, entries: list[dict]) -> Path:
    for entry in entries:
        image = entry.get("image")
        if isinstance(image, str) and not image.startswith(("/", "..")) and "bomb" not in image:
            write_png(tmp_path / image, seed=len(image))
    return write_json(tmp_path / "captions.json", entries)


# ------------------------------------------------------------------------- text that is not Unicode
def test_lone_surrogate_in_a_caption_is_a_bad_record_under_skip_and_fail(tmp_path: Path) -> None:
    path = caption_files(tmp_path, [
        {"id": "c1", "image": "a.png", "caption": "a red square"},
        {"id": "c2", "image": "b.png", "caption": f"broken {SURROGATE} text"},
        {"id": "c3", "image": "c.png", "caption": "a blue circle"},
    ])
    assert SURROGATE.encode("utf-8", "surrogatepass") not in path.read_bytes()  # an escape in the file
    ds = captions(path)
    assert ds.ids() == ["c1", "c3"]
    assert ds.error_report() == {"bad_text": ["c2"]}
    assert "bad_text 1" in ds.summary() and "c2" in ds.summary()
    for i in range(len(ds)):  # every record that is served encodes
        for turn in ds[i].query.turns:
            turn.text.encode("utf-8")
    with pytest.raises(VlmkitError) as info:
        captions(path, on_error="fail")
    message = str(info.value)
    assert "record c2" in message and "'caption'" in message and "U+D800" in message and "on_error: fail" in message
    message.encode("utf-8")  # the message itself prints


def test_lone_surrogate_in_a_conversation_names_the_turn(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 1)
    path = write_json(tmp_path / "llava.json", [
        {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A square."}]},
        {"id": "bad", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                           {"from": "gpt", "value": "A " + SURROGATE}]},
    ])
    ds = LlavaConversations(LlavaConversations.Config(path=path))
    assert ds.ids() == ["ok"] and ds.error_report() == {"bad_text": ["bad"]}
    with pytest.raises(VlmkitError, match=r"record bad: 'conversations\[1\]\.value' holds an invalid character"):
        LlavaConversations(LlavaConversations.Config(path=path, on_error="fail"))


def test_lone_surrogate_in_text_only_and_in_an_id(tmp_path: Path) -> None:
    path = write_json(tmp_path / "text.json", [
        {"id": "t1", "instruction": "Say hi.", "answer": "Hi."},
        {"id": "t" + SURROGATE, "instruction": "Say " + SURROGATE, "answer": "Hi."},
    ])
    ds = TextOnly(TextOnly.Config(path=path))
    assert ds.ids() == ["t1"]
    (bad,) = ds.error_report()["bad_text"]
    bad.encode("utf-8")  # the id is reported printable (escaped), not as the broken text
    assert bad == "t\\ud800"
    ds.summary().encode("utf-8")


def test_lone_surrogate_in_mimicit_is_a_bad_record(tmp_path: Path) -> None:
    data = {"meta": {}, "data": {
        "INS_1": {"instruction": "Q1?", "answer": "A1.", "image_ids": [], "rel_ins_ids": []},
        "INS_2": {"instruction": "Q2?", "answer": "A2 " + SURROGATE, "image_ids": [], "rel_ins_ids": []},
    }}
    path = tmp_path / "XX_instructions.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ds = MimicIT(MimicIT.Config(instructions=path, group="TEXT_ONLY"))
    assert len(ds) == 1 and ds.error_report() == {"bad_text": ["INS_2"]}
    with pytest.raises(VlmkitError, match=r"record 'INS_2': 'answer' holds an invalid character"):
        MimicIT(MimicIT.Config(instructions=path, group="TEXT_ONLY", on_error="fail"))


# ------------------------------------------------------------------------------ decompression bomb
def test_decompression_bomb_png_is_an_unreadable_image_under_the_policy(tmp_path: Path) -> None:
    write_bomb_png(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200
    path = caption_files(tmp_path, [
        {"id": "bomb", "image": "bomb.png", "caption": "a very large picture"},
        {"id": "ok", "image": "ok.png", "caption": "a small picture"},
    ])
    ds = captions(path)
    assert ds[0].id == "ok"  # the bomb's index serves the next good record
    assert ds.error_report() == {"unreadable_image": ["bomb"]}
    with pytest.raises(VlmkitError) as info:
        captions(path, on_error="fail")[0]
    message = str(info.value)
    assert "record bomb" in message and "bomb.png" in message and "decompression bomb" in message


def test_decompression_bomb_in_class_folders_is_a_clear_error(tmp_path: Path) -> None:
    from vlmkit.datasets.class_folders import ClassFolders

    write_bomb_png(tmp_path / "cats" / "big.png")
    ds = ClassFolders(ClassFolders.Config(root=str(tmp_path)))
    with pytest.raises(VlmkitError, match=r"picture '.*big\.png' cannot be read: .*decompression bomb"):
        ds[0]


# ------------------------------------------------------------------------ paths outside the folder
@pytest.mark.parametrize("how", ["absolute", "dotdot", "nested_dotdot"])
def test_image_paths_outside_the_image_folder_are_refused(tmp_path: Path, how: str) -> None:
    outside = write_png(tmp_path / "secret" / "private.png", 7)
    folder = tmp_path / "data"
    image = {"absolute": str(outside), "dotdot": "../secret/private.png",
             "nested_dotdot": "sub/../../secret/private.png"}[how]
    path = caption_files(folder, [
        {"id": "out", "image": image, "caption": "someone else's picture"},
        {"id": "in", "image": "sub/../in.png", "caption": "a picture of the data set"},  # stays inside: fine
    ])
    ds = captions(path)
    assert ds.ids() == ["in"] and ds.error_report() == {"outside_image_folder": ["out"]}
    with pytest.raises(VlmkitError) as info:
        captions(path, on_error="fail")
    message = str(info.value)
    assert "record out" in message and repr(image) in message and "allow_outside_image_folder: true" in message
    allowed = captions(path, allow_outside_image_folder=True)
    assert allowed.ids() == ["out", "in"]
    assert np.array_equal(np.asarray(allowed[0].query.media[0].frames[0]), np.asarray(Image.open(outside).convert("RGB")))


def test_outside_image_folder_message_names_the_recipe_field(tmp_path: Path) -> None:
    path = caption_files(tmp_path / "data", [{"id": "out", "image": "../x.png", "caption": "x"},
                                             {"id": "in", "image": "in.png", "caption": "y"}])
    spec = load_recipe(_captions_recipe(tmp_path, path, on_error="fail")).datasets["caps"]
    with pytest.raises(VlmkitError, match=r"set data\.caps\.allow_outside_image_folder: true"):
        build_dataset(get_registry(), "caps", spec)


# -------------------------------------------------------------------------------- missing data file
def _captions_recipe(tmp_path: Path, data_path: Path, **options: Any) -> Path:
    data = toy_mapping()
    data["data"] = {"caps": {"type": "captions", "template": "llava_plain", "path": str(data_path), **options}}
    for stage in data["stages"]:
        stage["data"] = ["caps"]
    return write_recipe(tmp_path, data, "captions_recipe.yaml")


def test_missing_data_file_names_the_recipe_field(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "captions.json"
    recipe = _captions_recipe(tmp_path, missing)
    spec = load_recipe(recipe).datasets["caps"]
    with pytest.raises(VlmkitError, match=r"^data\.caps\.path: '.*nowhere/captions\.json' does not exist"):
        build_dataset(get_registry(), "caps", spec)
    # built directly (no recipe), the message still names the option
    with pytest.raises(VlmkitError, match=r"^captions path: '.*captions\.json' does not exist"):
        captions(missing)


def test_run_with_a_missing_data_file_is_one_error_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere" / "captions.json"
    recipe = _captions_recipe(tmp_path, missing)
    out = tmp_path / "run"
    code = main(["run", str(recipe), "--profile", "smoke", "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert f"error: data.caps.path: '{missing}' does not exist" in err
    assert not out.exists()  # refused before anything was written


def test_missing_mimicit_file_names_the_recipe_field(tmp_path: Path) -> None:
    data = toy_mapping()
    data["data"] = {"mim": {"type": "mimicit", "template": "otter", "group": "TEXT_ONLY",
                            "instructions": str(tmp_path / "gone_instructions.json")}}
    for stage in data["stages"]:
        stage["data"] = ["mim"]
    spec = load_recipe(write_recipe(tmp_path, data, "m.yaml")).datasets["mim"]
    with pytest.raises(VlmkitError, match=r"^data\.mim\.instructions: '.*gone_instructions\.json' does not exist"):
        build_dataset(get_registry(), "mim", spec)


def test_not_utf8_data_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "captions.json"
    path.write_bytes(b'[{"image": "a.png", "caption": "caf\xe9"}]')  # Latin-1, not UTF-8
    with pytest.raises(VlmkitError, match=r"captions\.json: not UTF-8 text \(byte \d+"):
        captions(path)


def test_the_option_is_off_by_default() -> None:
    # the option is part of the captions config (and so of the recipe schema), default off
    assert Captions.Config.model_fields["allow_outside_image_folder"].default is False
    assert LlavaConversations.Config.model_fields["allow_outside_image_folder"].default is False
