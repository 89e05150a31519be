"""The LLaVA-style JSON readers: ``llava`` conversations, ``captions`` and ``text_only``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmkit.datasets.llava import Captions, LlavaConversations, TextOnly
from vlmkit.core.data.records import Record
from vlmkit.core.errors import VlmkitError


# ------------------------------------------------------------------------------------------ helpers
def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 12), mode: str = "RGB") -> np.ndarray:
    """A random image written as PNG; returns its pixels as RGB."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return np.asarray(image.convert("RGB"))


def write_json(path: Path, entries: list[Any], jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    else:
        path.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return path


def pixels(record: Record, media: int = 0) -> np.ndarray:
    image = record.query.media[media].frames[0]
    assert image.mode == "RGB"
    return np.asarray(image)


def turns(record: Record) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in record.query.turns]


def llava(path: Path, **options: Any) -> LlavaConversations:
    return LlavaConversations(LlavaConversations.Config(path=path, **options))


def captions(path: Path, **options: Any) -> Captions:
    return Captions(Captions.Config(path=path, **options))


def text_only(path: Path, **options: Any) -> TextOnly:
    return TextOnly(TextOnly.Config(path=path, **options))


CONVERSATIONS = [
    {
        "id": "a1",
        "image": "coco/a1.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "Noise, mostly."},
            {"from": "human", "value": "Which colour dominates?"},
            {"from": "gpt", "value": "None of them."},
        ],
    },
    {
        "id": "a2",
        "image": "coco/a2.png",
        "conversations": [
            {"from": "human", "value": "Describe it briefly.\n<image>"},
            {"from": "gpt", "value": "Random pixels."},
        ],
    },
    {
        "id": "t3",
        "conversations": [
            {"from": "human", "value": "What is two plus two?"},
            {"from": "gpt", "value": "Four."},
        ],
    },
    {
        "id": "a4",
        "image": "a4.png",  # RGBA on disk, read as RGB
        "conversations": [
            {"from": "human", "value": "Look: <image> what now?"},
            {"from": "gpt", "value": "Still noise."},
        ],
    },
]


@pytest.fixture()
def llava_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "images"
    images = {
        "coco/a1.png": write_image(folder / "coco" / "a1.png", 1),
        "coco/a2.png": write_image(folder / "coco" / "a2.png", 2, size=(8, 30)),
        "a4.png": write_image(folder / "a4.png", 4, mode="RGBA"),
    }
    return folder, images


# ---------------------------------------------------------------------------------------- llava
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_llava_conversations_read_exactly(tmp_path: Path, llava_dir, jsonl: bool) -> None:
    folder, images = llava_dir
    path = write_json(tmp_path / ("data.jsonl" if jsonl else "data.json"), CONVERSATIONS, jsonl)
    ds = llava(path, image_folder=folder)
    assert len(ds) == 4 and ds.ids() == ["a1", "a2", "t3", "a4"]

    first = ds[0]
    assert first.id == "a1" and len(first.query.media) == 1 and first.context == [] and not first.shared_media
    assert turns(first) == [
        ("user", "What is in the picture?"),
        ("assistant", "Noise, mostly."),
        ("user", "Which colour dominates?"),
        ("assistant", "None of them."),
    ]
    assert [m.id for m in first.query.media] == ["coco/a1.png"]
    assert len(first.query.media[0].frames) == 1
    np.testing.assert_array_equal(pixels(first), images["coco/a1.png"])

    second = ds[1]
    assert turns(second) == [("user", "Describe it briefly."), ("assistant", "Random pixels.")]
    assert pixels(second).shape == (30, 8, 3)
    np.testing.assert_array_equal(pixels(second), images["coco/a2.png"])

    text = ds[2]
    assert text.query.media == []
    assert turns(text) == [("user", "What is two plus two?"), ("assistant", "Four.")]

    rgba = ds[3]
    assert turns(rgba)[0] == ("user", "Look:\nwhat now?")
    np.testing.assert_array_equal(pixels(rgba), images["a4.png"])
    assert ds.error_report() == {} and ds.summary() == ""


def test_llava_images_are_read_lazily(tmp_path: Path, llava_dir) -> None:
    folder, images = llava_dir
    path = write_json(tmp_path / "data.json", CONVERSATIONS)
    ds = llava(path, image_folder=folder)  # nothing opened yet: a replaced file is what __getitem__ reads
    replaced = write_image(folder / "coco" / "a1.png", 99)
    np.testing.assert_array_equal(pixels(ds[0]), replaced)


def test_image_folder_defaults_to_the_json_folder(tmp_path: Path) -> None:
    expected = write_image(tmp_path / "pics" / "x.png", 7)
    path = write_json(tmp_path / "data.json", [
        {"id": "x", "image": "pics/x.png", "conversations": [{"from": "human", "value": "<image>"},
                                                             {"from": "gpt", "value": "noise"}]},
    ])
    record = llava(path)[0]
    assert turns(record) == [("user", ""), ("assistant", "noise")]
    np.testing.assert_array_equal(pixels(record), expected)


def test_limit_keeps_the_first_usable_records(tmp_path: Path, llava_dir) -> None:
    folder, _ = llava_dir
    bad = {"id": "bad", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}
    path = write_json(tmp_path / "data.json", [bad, *CONVERSATIONS])
    ds = llava(path, image_folder=folder, limit=2)
    assert ds.ids() == ["a1", "a2"]
    assert ds.error_report() == {"malformed": ["bad"]}


# ------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_captions_read_exactly(tmp_path: Path, jsonl: bool) -> None:
    folder = tmp_path / "imgs"
    expected = [write_image(folder / f"{i}.png", 10 + i) for i in range(3)]
    entries = [{"image": f"{i}.png", "caption": f"caption number {i}"} for i in range(3)]
    entries[1]["id"] = "custom"
    path = write_json(tmp_path / ("caps.jsonl" if jsonl else "caps.json"), entries, jsonl)
    ds = captions(path, image_folder=folder)
    assert len(ds) == 3 and ds.ids() == ["0.png", "custom", "2.png"]
    for i in range(3):
        record = ds[i]
        assert record.context == []
        assert turns(record) == [("user", ""), ("assistant", f"caption number {i}")]
        assert [m.id for m in record.query.media] == [f"{i}.png"]
        np.testing.assert_array_equal(pixels(record), expected[i])

    prompted = captions(path, image_folder=folder, prompt="Describe the image.")
    assert turns(prompted[2]) == [("user", "Describe the image."), ("assistant", "caption number 2")]


# ------------------------------------------------------------------------------------ text_only
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_text_only_read_exactly(tmp_path: Path, jsonl: bool) -> None:
    entries = [{"instruction": "Say hi.", "answer": "hi"}, {"id": 17, "instruction": "Count to two.", "answer": "one two"}]
    path = write_json(tmp_path / ("t.jsonl" if jsonl else "t.json"), entries, jsonl)
    ds = text_only(path)
    assert len(ds) == 2 and ds.ids() == ["#0", "17"]
    assert [turns(ds[i]) for i in range(2)] == [
        [("user", "Say hi."), ("assistant", "hi")],
        [("user", "Count to two."), ("assistant", "one two")],
    ]
    assert all(ds[i].query.media == [] for i in range(2))


def test_text_only_has_no_image_folder_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_folder"):
        TextOnly.Config(path=tmp_path / "t.json", image_folder=tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        Captions.Config(path=tmp_path / "c.json", on_error="ignore")


# ------------------------------------------------------------------------------------ bad records
def _conversation(rid: str, first: str, answer: str, image: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": rid, "conversations": [{"from": "human", "value": first},
                                                          {"from": "gpt", "value": answer}]}
    if image is not None:
        entry["image"] = image
    return entry


MALFORMED_CONVERSATIONS = {
    "starts_with_gpt": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
    "two_humans": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"}],
    "ends_with_human": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}],
    "unknown_role": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}],
    "not_a_list": "q: a",
    "empty": [],
    "value_not_text": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}],
}


@pytest.mark.parametrize("problem", sorted(MALFORMED_CONVERSATIONS))
def test_malformed_conversation_skip_and_fail(tmp_path: Path, problem: str) -> None:
    good = [_conversation("g0", "q0", "a0"), _conversation("g2", "q2", "a2")]
    bad = {"id": "bad1", "conversations": MALFORMED_CONVERSATIONS[problem]}
    path = write_json(tmp_path / "conv.json", [good[0], bad, good[1]])
    ds = llava(path)
    assert ds.ids() == ["g0", "g2"]
    assert [turns(ds[i])[0][1] for i in range(2)] == ["q0", "q2"]
    assert ds.error_report() == {"malformed": ["bad1"]}
    assert "skipped 1 record (malformed 1): first ids bad1" in ds.summary()

    with pytest.raises(VlmkitError) as info:
        llava(path, on_error="fail")
    assert str(path) in str(info.value) and "bad1" in str(info.value)


def test_image_marker_in_the_wrong_place_is_malformed(tmp_path: Path) -> None:
    write_image(tmp_path / "x.png", 0)
    entries = [
        _conversation("ok", "<image>\nq", "a", image="x.png"),
        _conversation("text_with_marker", "<image>\nq", "a"),
        {"id": "late_marker", "image": "x.png", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
            {"from": "human", "value": "<image> q2"}, {"from": "gpt", "value": "a2"}]},
        _conversation("two_markers", "<image><image>q", "a", image="x.png"),
    ]
    ds = llava(write_json(tmp_path / "c.json", entries))
    assert ds.ids() == ["ok"]
    assert ds.error_report() == {"malformed": ["text_with_marker", "late_marker", "two_markers"]}


@pytest.mark.parametrize("reader", ["llava", "captions", "text_only"])
def test_empty_answer_skip_and_fail(tmp_path: Path, reader: str) -> None:
    write_image(tmp_path / "x.png", 0)
    if reader == "llava":
        entries = [_conversation("e0", "q", "a"), _conversation("empty1", "q", "  "), _conversation("e2", "q", "b")]
        make, good = llava, ["e0", "e2"]
    elif reader == "captions":
        entries = [{"id": "e0", "image": "x.png", "caption": "a"}, {"id": "empty1", "image": "x.png", "caption": ""},
                   {"id": "e2", "image": "x.png", "caption": "b"}]
        make, good = captions, ["e0", "e2"]
    else:
        entries = [{"id": "e0", "instruction": "q", "answer": "a"}, {"id": "empty1", "instruction": "q", "answer": "\n"},
                   {"id": "e2", "instruction": "q", "answer": "b"}]
        make, good = text_only, ["e0", "e2"]
    path = write_json(tmp_path / "d.json", entries)
    ds = make(path)
    assert ds.ids() == good
    assert turns(ds[1])[-1] == ("assistant", "b")
    assert ds.error_report() == {"empty_answer": ["empty1"]}
    assert "empty_answer 1" in ds.summary()

    with pytest.raises(VlmkitError) as info:
        make(path, on_error="fail")
    assert str(path) in str(info.value) and "empty1" in str(info.value) and "empty" in str(info.value)


@pytest.mark.parametrize("reader", ["llava", "captions"])
def test_missing_image_skip_returns_the_next_good_record(tmp_path: Path, reader: str) -> None:
    expected = {i: write_image(tmp_path / f"{i}.png", i) for i in (0, 2, 3)}  # 1.png and 4.png are missing
    if reader == "llava":
        entries = [_conversation(f"r{i}", f"<image>\nq{i}", f"a{i}", image=f"{i}.png") for i in range(5)]
        make = llava
    else:
        entries = [{"id": f"r{i}", "image": f"{i}.png", "caption": f"a{i}"} for i in range(5)]
        make = captions
    path = write_json(tmp_path / "d.json", entries)
    ds = make(path)
    assert len(ds) == 5  # found only when read

    record = ds[1]
    assert record.id == "r2" and turns(record)[-1] == ("assistant", "a2")
    np.testing.assert_array_equal(pixels(record), expected[2])
    assert ds[1].id == "r2"  # the same record on every call
    assert ds[4].id == "r0"  # wraps around
    assert [ds[i].id for i in range(5)] == ["r0", "r2", "r2", "r3", "r0"]
    assert ds.error_report() == {"missing_image": ["r1", "r4"]}
    assert "missing_image 2" in ds.summary() and "r1, r4" in ds.summary()

    # the marks survive pickling (DataLoader workers get a copy)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.error_report() == {"missing_image": ["r1", "r4"]} and copy[1].id == "r2"

    failing = make(path, on_error="fail")
    assert failing[0].id == "r0"
    with pytest.raises(VlmkitError) as info:
        failing[1]
    message = str(info.value)
    assert str(path) in message and "r1" in message and "1.png" in message


def test_unreadable_image_is_skipped(tmp_path: Path) -> None:
    write_image(tmp_path / "0.png", 0)
    (tmp_path / "1.png").write_bytes(b"not a png at all")
    write_image(tmp_path / "2.png", 2)
    entries = [{"id": f"r{i}", "image": f"{i}.png", "caption": f"a{i}"} for i in range(3)]
    ds = captions(write_json(tmp_path / "d.json", entries))
    assert ds[1].id == "r2"
    assert ds.error_report() == {"unreadable_image": ["r1"]}
    with pytest.raises(VlmkitError, match="r1"):
        captions(tmp_path / "d.json", on_error="fail")[1]


def test_all_images_missing_is_an_error(tmp_path: Path) -> None:
    entries = [{"id": f"r{i}", "image": f"{i}.png", "caption": "a"} for i in range(2)]
    ds = captions(write_json(tmp_path / "d.json", entries))
    with pytest.raises(VlmkitError, match="readable image"):
        ds[0]


def test_bad_jsonl_line_is_a_malformed_record(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "q", "answer": "a"}\n{"instruction": oops}\n\n{"instruction": "q2", "answer": "b"}\n')
    ds = text_only(path)
    assert len(ds) == 2 and ds.error_report() == {"malformed": ["#1"]}
    with pytest.raises(VlmkitError, match="line 2"):
        text_only(path, on_error="fail")


# ---------------------------------------------------------------------------------- file errors
@pytest.mark.parametrize("make,name", [(llava, "llava"), (captions, "captions"), (text_only, "text_only")])
def test_missing_path_names_the_field(tmp_path: Path, make, name: str) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(VlmkitError) as info:
        make(missing)
    assert f"{name} path" in str(info.value) and str(missing) in str(info.value)


def test_missing_image_folder_names_the_field(tmp_path: Path) -> None:
    path = write_json(tmp_path / "c.json", [{"image": "x.png", "caption": "a"}])
    with pytest.raises(VlmkitError, match="captions image_folder: .*nowhere"):
        captions(path, image_folder=tmp_path / "nowhere")


def test_not_a_list_and_not_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('"just a string"')
    with pytest.raises(VlmkitError, match="expected a JSON list"):
        text_only(path)
    path.write_text("[{]")
    with pytest.raises(VlmkitError, match="not valid JSON"):
        text_only(path)
    path.write_text("[]")
    with pytest.raises(VlmkitError, match="no usable"):
        text_only(path)


def test_registered_types() -> None:
    from vlmkit.core.registry import get_registry

    registry = get_registry()
    for name, cls in (("llava", LlavaConversations), ("captions", Captions), ("text_only", TextOnly)):
        assert registry.component_class("dataset", name) is cls
