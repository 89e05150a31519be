"""The ``mimicit`` dataset and the lazy image stores (REFERENCE 1.6): a small MIMIC-IT data set in
the real on-disk format, read back exactly; in-context examples, media modes, video frames, bad
records under both ``on_error`` policies, and no image decoded before it is asked for."""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from vlmkit.core.data import images as images_module
from vlmkit.core.data.images import (
    ImageDecodeError,
    ImageStoreError,
    JsonImages,
    MissingImageError,
    ParquetImages,
    decode_base64,
    open_image_store,
    rewrite_row_groups,
    write_parquet_images,
)
from vlmkit.datasets.mimicit import MimicIT, MimicITConfig, resample_frames
from vlmkit.core.data.records import Record
from vlmkit.core.errors import VlmkitError


# --------------------------------------------------------------------------------------- fixtures
def noise_png(seed: int, size: int = 12) -> tuple[np.ndarray, bytes]:
    """A deterministic noise image (its pixels, its PNG bytes): PNG is lossless, so the decoded
    pixels must equal these exactly."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return pixels, buffer.getvalue()


def b64_std(data: bytes) -> str:
    text = base64.b64encode(data).decode()
    assert "+" in text or "/" in text  # the alphabet actually matters for this value
    return text


def b64_url(data: bytes) -> str:
    text = base64.urlsafe_b64encode(data).decode()
    assert "-" in text or "_" in text
    return text


IMAGE_IDS = ["IMG_A", "IMG_B", "IMG_C", "IMG_D", "IMG_E"]
CLIP_X = [f"VID_X_{i:04d}" for i in range(8)]
CLIP_Y = [f"VID_Y_{i:04d}" for i in range(4)]
ALL_IMAGE_IDS = IMAGE_IDS + CLIP_X + CLIP_Y
PIXELS: dict[str, np.ndarray] = {}
PNG: dict[str, bytes] = {}
for _seed, _id in enumerate(ALL_IMAGE_IDS):
    PIXELS[_id], PNG[_id] = noise_png(_seed)


def ins(instruction: str, answer: str, image_ids=None, rel=None) -> dict:
    record = {"instruction": instruction, "answer": answer}
    if image_ids is not None:
        record["image_ids"] = image_ids
    record["rel_ins_ids"] = rel or []
    return record


# an IMAGE_TEXT subset: INS_1.._3 are about IMG_A (same image, other instructions), INS_4 about
# IMG_B with INS_5 (IMG_C) and INS_6 (IMG_D) as other-image examples
IMAGE_DATA = {
    "INS_1": ins("What is in the picture?", "Static noise.", ["IMG_A"], ["INS_2", "INS_3"]),
    "INS_2": ins("Which colours appear?", "All of them.", ["IMG_A"], ["INS_1"]),
    "INS_3": ins("  Is it a photo?\n", " No, it is generated.  ", ["IMG_A"], []),
    "INS_4": ins("Describe the image.", "More noise.", ["IMG_B"], ["INS_5", "INS_6"]),
    "INS_5": ins("And this one?", "Also noise.", ["IMG_C"], []),
    "INS_6": ins("What about here?", "Noise again.", ["IMG_D"], ["INS_5"]),
}
TRAIN = {"INS_4": ["INS_1", "INS_5", "INS_6"], "INS_1": ["INS_3"], "INS_2": []}


def write_images(folder: Path, fmt: str, values: dict[str, str] | None = None, *, row_group_size: int = 2) -> Path:
    """All fixture images as ``XX.json`` (standard alphabet, one URL-safe value) or ``XX.parquet``
    (alternating alphabets, pandas index); ``values`` overrides stored values."""
    stored = {}
    for i, image_id in enumerate(ALL_IMAGE_IDS):
        url = (i % 2 == 1) if fmt == "parquet" else image_id == "IMG_E"
        stored[image_id] = b64_url(PNG[image_id]) if url else b64_std(PNG[image_id])
    stored.update(values or {})
    if fmt == "json":
        path = folder / "XX.json"
        path.write_text(json.dumps(stored, indent=1))
    else:
        path = folder / "XX.parquet"
        write_parquet_images(stored.items(), path, row_group_size=row_group_size)
    return path


def write_subset(folder: Path, data: dict, *, fmt: str = "parquet", train: dict | None = None, values=None) -> dict:
    """A MIMIC-IT subset on disk; returns the config paths."""
    folder.mkdir(parents=True, exist_ok=True)
    instructions = folder / "XX_instructions.json"
    instructions.write_text(json.dumps({"meta": {"version": "0.0.1", "time": "2023-06", "author": "test"}, "data": data}))
    paths = {"instructions": str(instructions), "images": str(write_images(folder, fmt, values))}
    if train is not None:
        (folder / "XX_train.json").write_text(json.dumps(train))
        paths["train_config"] = str(folder / "XX_train.json")
    return paths


def dataset(**config) -> MimicIT:
    return MimicIT(MimicITConfig(**config))


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def texts(exchange) -> tuple[str, str]:
    assert [t.role for t in exchange.turns] == ["user", "assistant"]
    return exchange.turns[0].text, exchange.turns[1].text


# ------------------------------------------------------------------------------------ image stores
def test_decode_base64_detects_the_alphabet_per_value():
    data = PNG["IMG_A"]
    assert decode_base64(b64_std(data)) == data
    assert decode_base64(b64_url(data)) == data
    assert decode_base64(b64_url(data).rstrip("=")) == data  # padding optional
    assert decode_base64("data:image/png;base64," + b64_std(data)) == data
    with pytest.raises(ValueError, match="mixes"):
        decode_base64("ab+c-d==")
    with pytest.raises(ValueError):
        decode_base64("not base64 at all!")


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_stores_return_the_written_pixels(tmp_path, fmt):
    store = open_image_store(write_images(tmp_path, fmt))
    assert isinstance(store, JsonImages if fmt == "json" else ParquetImages)
    assert store.ids() == ALL_IMAGE_IDS and len(store) == len(ALL_IMAGE_IDS)
    assert "IMG_C" in store and "IMG_Z" not in store
    for image_id in ALL_IMAGE_IDS:
        np.testing.assert_array_equal(pixels(store.get(image_id)), PIXELS[image_id])
    with pytest.raises(MissingImageError, match="IMG_Z") as missing:
        store.get("IMG_Z")
    assert missing.value.image_id == "IMG_Z" and isinstance(missing.value, KeyError)


def test_parquet_id_column_forms(tmp_path):
    # ids in a plain 'id' column, raw image bytes in a binary column, one row group
    ids = ["a", "b", "c"]
    table = pa.table({"id": ids, "base64": pa.array([PNG[i] for i in IMAGE_IDS[:3]], pa.binary())})
    pq.write_table(table, tmp_path / "raw.parquet")
    store = ParquetImages(tmp_path / "raw.parquet")
    assert store.id_column == "id"
    np.testing.assert_array_equal(pixels(store.get("b")), PIXELS["IMG_B"])
    # a named pandas index
    table = pa.table({"base64": [b64_url(PNG["IMG_A"])], "image": ["x"]})
    table = table.replace_schema_metadata({b"pandas": json.dumps({"index_columns": ["image"], "columns": []}).encode()})
    pq.write_table(table, tmp_path / "named.parquet")
    assert ParquetImages(tmp_path / "named.parquet").id_column == "image"
    # neither: an error that lists the columns
    pq.write_table(pa.table({"base64": ["x"], "p": ["1"], "q": ["2"]}), tmp_path / "amb.parquet")
    with pytest.raises(ImageStoreError, match="image ids.*base64, p, q"):
        ParquetImages(tmp_path / "amb.parquet")
    pq.write_table(pa.table({"id": ["x"], "data": ["1"]}), tmp_path / "nob64.parquet")
    with pytest.raises(ImageStoreError, match="no 'base64' column"):
        ParquetImages(tmp_path / "nob64.parquet")


def test_parquet_reads_only_the_row_group_of_the_image(tmp_path, monkeypatch):
    path = write_images(tmp_path, "parquet", row_group_size=3)
    assert pq.ParquetFile(path).metadata.num_row_groups == 6  # 17 images, 3 per group
    store = ParquetImages(path)
    reads: list[tuple[int, tuple]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        reads.append((i, tuple(columns or ())))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    np.testing.assert_array_equal(pixels(store.get(ALL_IMAGE_IDS[7])), PIXELS[ALL_IMAGE_IDS[7]])
    assert reads == [(2, ("base64",))]  # row 7 is in group 2; only the base64 column
    store.get(ALL_IMAGE_IDS[8])  # same group: cached
    assert len(reads) == 1
    store.get(ALL_IMAGE_IDS[0])
    assert reads[-1] == (0, ("base64",)) and len(store._cache) == 1  # one group held at a time


def test_parquet_large_row_groups_are_streamed(tmp_path, monkeypatch):
    path = write_images(tmp_path, "parquet", row_group_size=100)  # one group
    with pytest.warns(UserWarning, match="rewrite_row_groups"):
        store = ParquetImages(path, max_group_bytes=0, stream_batch=2)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda *a, **k: pytest.fail("read a whole group"))
    order = ALL_IMAGE_IDS[5:] + ALL_IMAGE_IDS[:5] + ALL_IMAGE_IDS[::-1]
    for image_id in order:
        np.testing.assert_array_equal(pixels(store.get(image_id)), PIXELS[image_id])
    # and the remedy: small row groups
    monkeypatch.undo()
    small = rewrite_row_groups(path, tmp_path / "small.parquet", row_group_size=4)
    assert pq.ParquetFile(small).metadata.num_row_groups == 5
    again = ParquetImages(small)
    assert again.ids() == ALL_IMAGE_IDS
    np.testing.assert_array_equal(pixels(again.get("VID_Y_0003")), PIXELS["VID_Y_0003"])


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 8, 13, 1 << 20])
def test_json_store_indexes_by_offsets_streaming(tmp_path, monkeypatch, chunk_size):
    value_a = b64_std(PNG["IMG_A"])
    text = (
        '\n{ "IMG_A" :\n  "' + value_a.replace("/", "\\/") + '",'  # JSON may escape '/'
        '"we\\"ird \\u00e9" : "' + b64_url(PNG["IMG_B"]) + '" ,'
        '"IMG_C": "' + b64_std(PNG["IMG_D"]) + '",'  # overwritten below: the last value wins
        '"nothing": null, "num": 12.5e3,'
        '"IMG_C": "' + b64_std(PNG["IMG_C"]) + '"}\n'
    )
    path = tmp_path / "XX.json"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("json.load of the whole file"))
    store = JsonImages(path, chunk_size=chunk_size)
    assert store.ids() == ["IMG_A", 'we"ird é', "IMG_C", "nothing", "num"]
    np.testing.assert_array_equal(pixels(store.get("IMG_A")), PIXELS["IMG_A"])
    np.testing.assert_array_equal(pixels(store.get('we"ird é')), PIXELS["IMG_B"])
    np.testing.assert_array_equal(pixels(store.get("IMG_C")), PIXELS["IMG_C"])
    for image_id in ("nothing", "num"):
        with pytest.raises(ImageDecodeError) as error:
            store.get(image_id)
        assert error.value.image_id == image_id
    # the index holds offsets, not values
    assert not any(isinstance(v, str) and len(v) > 100 for v in vars(store).values())


def test_json_store_rejects_what_is_not_a_flat_map(tmp_path):
    for text, match in [
        ('["IMG_A"]', "expected '{'"),
        ('{"IMG_A": {"b64": "x"}}', "nested object"),
        ('{"IMG_A": "abc"', "expected ',' or '}'"),
        ('{"IMG_A": "abc', "unterminated"),
        ('{IMG_A: "abc"}', "quoted image id"),
    ]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ImageStoreError, match=match):
            JsonImages(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(" {}\n")
    assert len(JsonImages(tmp_path / "empty.json")) == 0
    with pytest.raises(ImageStoreError, match="does not exist"):
        open_image_store(tmp_path / "nope.parquet")


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_undecodable_data_raises_with_the_id(tmp_path, fmt):
    not_png = base64.b64encode(b"this is not an image, just bytes").decode()
    store = open_image_store(write_images(tmp_path, fmt, {"IMG_A": "%%% not base64 %%%", "IMG_B": not_png}))
    for image_id, reason in (("IMG_A", "not base64"), ("IMG_B", "cannot identify image")):
        with pytest.raises(ImageDecodeError, match=reason) as error:
            store.get(image_id)
        assert error.value.image_id == image_id and str(store.path) in str(error.value)
        copy = pickle.loads(pickle.dumps(error.value))
        assert copy.image_id == image_id and str(copy) == str(error.value)
    np.testing.assert_array_equal(pixels(store.get("IMG_C")), PIXELS["IMG_C"])


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_stores_pickle_and_reopen(tmp_path, fmt):
    store = open_image_store(write_images(tmp_path, fmt))
    store.get("IMG_A")  # opens the file
    copy = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(pixels(copy.get("VID_X_0005")), PIXELS["VID_X_0005"])


# ------------------------------------------------------------------------------------------ dataset
@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_image_text_with_train_config(tmp_path, fmt):
    ds = dataset(group="IMAGE_TEXT", **write_subset(tmp_path, IMAGE_DATA, fmt=fmt, train=TRAIN))
    assert len(ds) == 3 and ds.context_mode == "same_media"  # the train config's keys, in order
    first = ds[0]
    assert isinstance(first, Record) and first.id == "INS_4"
    assert texts(first.query) == ("Describe the image.", "More noise.")
    assert first.query.id == "INS_4"
    # every id of the train config's list (not INS_4's rel_ins_ids)
    assert [c.id for c in first.context] == ["INS_1", "INS_5", "INS_6"]
    assert [texts(c) for c in first.context] == [
        ("What is in the picture?", "Static noise."),
        ("And this one?", "Also noise."),
        ("What about here?", "Noise again."),
    ]
    # same_media: one leading image, on the query; the examples carry none
    assert first.shared_media is True
    assert [m.id for m in first.query.media] == ["IMG_B"] and all(c.media == [] for c in first.context)
    [media] = first.query.media
    assert len(media.frames) == 1
    np.testing.assert_array_equal(pixels(media.frames[0]), PIXELS["IMG_B"])

    second = ds[1]
    assert second.id == "INS_1" and [c.id for c in second.context] == ["INS_3"]
    assert texts(second.context[0]) == ("Is it a photo?", "No, it is generated.")  # outer whitespace only
    third = ds[2]
    assert third.id == "INS_2" and third.context == [] and third.shared_media is False
    np.testing.assert_array_equal(pixels(third.query.media[0].frames[0]), PIXELS["IMG_A"])
    with pytest.raises(IndexError):
        ds[3]
    assert ds[-1].id == "INS_2"
    assert ds.error_report() == {} and ds.summary() == ""


def test_rel_ins_ids_by_default_and_max_context(tmp_path):
    paths = write_subset(tmp_path, IMAGE_DATA)
    ds = dataset(group="IMAGE_TEXT", **paths)
    assert [r.id for r in (ds[i] for i in range(len(ds)))] == list(IMAGE_DATA)
    assert [c.id for c in ds[0].context] == ["INS_2", "INS_3"]
    assert [c.id for c in ds[3].context] == ["INS_5", "INS_6"]
    one = dataset(group="IMAGE_TEXT", max_context=1, **paths)
    assert [c.id for c in one[0].context] == ["INS_3"]  # the last one
    assert [c.id for c in one[3].context] == ["INS_6"]
    none = dataset(group="IMAGE_TEXT", max_context=0, **paths)
    assert none[0].context == [] and none[0].shared_media is False
    limited = dataset(group="IMAGE_TEXT", limit=2, **paths)
    assert len(limited) == 2 and limited[1].id == "INS_2"


def test_per_example_media(tmp_path):
    paths = write_subset(tmp_path, IMAGE_DATA)
    ds = dataset(group="IMAGE_TEXT", context_mode="per_example", **paths)
    record = ds[3]  # INS_4 with INS_5 (IMG_C), INS_6 (IMG_D)
    assert record.shared_media is False
    assert [[m.id for m in c.media] for c in record.context] == [["IMG_C"], ["IMG_D"]]
    assert [m.id for m in record.query.media] == ["IMG_B"]
    for exchange, image_id in zip(record.context + [record.query], ["IMG_C", "IMG_D", "IMG_B"]):
        np.testing.assert_array_equal(pixels(exchange.media[0].frames[0]), PIXELS[image_id])
    # the in-context group defaults to per_example, explicitly overridable
    in_context = dataset(group="IMAGE_TEXT_IN_CONTEXT", **paths)
    assert in_context.context_mode == "per_example"
    assert [[m.id for m in c.media] for c in in_context[3].context] == [["IMG_C"], ["IMG_D"]]
    shared = dataset(group="IMAGE_TEXT_IN_CONTEXT", context_mode="same_media", **paths)
    assert shared[3].shared_media is True and all(c.media == [] for c in shared[3].context)


def test_video_frames_resampled_evenly(tmp_path):
    assert resample_frames(list("abcdefgh"), 4) == ["a", "c", "e", "h"]  # frames 0, 2, 4, 7
    assert resample_frames(list("abcd"), 4) == list("abcd")
    assert resample_frames(list("ab"), 4) == ["a", "a", "a", "b"]  # Otter's linspace, truncated
    assert resample_frames(list("abc"), 1) == ["a"]
    data = {
        "VID_INS_1": ins("What happens in the video?", "Nothing much.", CLIP_X, ["VID_INS_2"]),
        "VID_INS_2": ins("How long is it?", "Eight seconds.", CLIP_X, []),
        "VID_INS_3": ins("And this clip?", "Four seconds.", CLIP_Y, ["VID_INS_1"]),
    }
    paths = write_subset(tmp_path, data)
    ds = dataset(group="VIDEO_TEXT", num_frames=4, **paths)
    record = ds[0]
    [clip] = record.query.media
    assert clip.id == "VID_X" and len(clip.frames) == 4
    for frame, index in zip(clip.frames, [0, 2, 4, 7]):
        np.testing.assert_array_equal(pixels(frame), PIXELS[f"VID_X_{index:04d}"])
    assert record.shared_media is True and texts(record.context[0]) == ("How long is it?", "Eight seconds.")
    per_example = dataset(group="VIDEO_TEXT", num_frames=2, context_mode="per_example", **paths)
    record = per_example[2]
    assert [m.id for m in record.context[0].media] == ["VID_X"] and [m.id for m in record.query.media] == ["VID_Y"]
    for frame, frame_id in zip(record.query.media[0].frames, ["VID_Y_0000", "VID_Y_0003"]):
        np.testing.assert_array_equal(pixels(frame), PIXELS[frame_id])
    assert len(record.context[0].media[0].frames) == 2


def test_text_only_needs_no_images(tmp_path):
    data = {
        "TXT_1": {"instruction": "Say hi.", "answer": "Hi!", "rel_ins_ids": ["TXT_2"]},
        "TXT_2": {"instruction": "Count to two.", "answer": "One, two."},  # no image_ids, no rel_ins_ids
        "TXT_3": ins("Ignore images?", "Yes.", ["IMG_NOT_THERE"]),  # ids ignored for TEXT_ONLY
    }
    paths = write_subset(tmp_path, data)
    ds = dataset(group="TEXT_ONLY", instructions=paths["instructions"])
    assert ds.images is None and len(ds) == 3
    record = ds[0]
    assert record.query.media == [] and record.shared_media is False
    assert texts(record.query) == ("Say hi.", "Hi!") and texts(record.context[0]) == ("Count to two.", "One, two.")
    assert record.context[0].media == [] and ds[2].query.media == []
    with pytest.raises(VlmkitError, match="images: group IMAGE_TEXT needs"):
        dataset(group="IMAGE_TEXT", instructions=paths["instructions"])


def test_construction_decodes_no_image(tmp_path, monkeypatch):
    calls: list[str] = []
    real = images_module.decode_image

    def counting(data, image_id, source=""):
        calls.append(image_id)
        return real(data, image_id, source)

    monkeypatch.setattr(images_module, "decode_image", counting)
    for fmt in ("json", "parquet"):
        paths = write_subset(tmp_path / fmt, IMAGE_DATA, fmt=fmt, train=TRAIN)
        ds = dataset(group="IMAGE_TEXT", context_mode="per_example", **paths)
        assert calls == []
        ds[0]  # INS_4 (IMG_B) with INS_1 (IMG_A), INS_5 (IMG_C), INS_6 (IMG_D)
        assert sorted(calls) == ["IMG_A", "IMG_B", "IMG_C", "IMG_D"]
        calls.clear()


def test_config_validation(tmp_path):
    paths = write_subset(tmp_path, IMAGE_DATA)
    with pytest.raises(ValidationError, match="group"):
        MimicITConfig(group="IMAGE", **paths)
    with pytest.raises(ValidationError, match="group"):
        MimicITConfig(**paths)  # never guessed
    with pytest.raises(ValidationError, match="frames"):
        MimicITConfig(group="IMAGE_TEXT", frames=4, **paths)
    with pytest.raises(ValidationError, match="on_error"):
        MimicITConfig(group="IMAGE_TEXT", on_error="ignore", **paths)
    with pytest.raises(VlmkitError, match="mimicit instructions: .*nope.json' does not exist"):
        dataset(group="IMAGE_TEXT", instructions=str(tmp_path / "nope.json"), images=paths["images"])
    with pytest.raises(VlmkitError, match="mimicit train_config: .*nope.json' does not exist"):
        dataset(group="IMAGE_TEXT", train_config=str(tmp_path / "nope.json"), **paths)
    (tmp_path / "flat.json").write_text(json.dumps(IMAGE_DATA))
    with pytest.raises(VlmkitError, match="not a MIMIC-IT instructions file"):
        dataset(group="IMAGE_TEXT", instructions=str(tmp_path / "flat.json"), images=paths["images"])
    (tmp_path / "broken.json").write_text('{"meta": {}, "data": {')
    with pytest.raises(VlmkitError, match="not valid JSON"):
        dataset(group="IMAGE_TEXT", instructions=str(tmp_path / "broken.json"), images=paths["images"])


def test_registry_entry():
    from vlmkit.core.registry import get_registry

    assert get_registry().component_class("dataset", "mimicit") is MimicIT


# ------------------------------------------------------------------------------------- bad records
BAD_AT_INIT = {
    # kind: (instructions, train config or None, the bad record id, what the message says); the bad
    # record INS_7 is nobody's in-context example
    "empty_answer": ({**IMAGE_DATA, "INS_7": ins("Anything?", "  ", ["IMG_E"])}, None, "INS_7", "empty answer"),
    "unknown_context_id": (IMAGE_DATA, {**TRAIN, "INS_3": ["INS_1", "INS_99"]}, "INS_3", "in-context id 'INS_99'"),
    "missing_image_id": ({**IMAGE_DATA, "INS_7": ins("Q?", "A.", ["IMG_E", "IMG_GONE"])}, None, "INS_7", "'IMG_GONE' is not in"),
    "unknown_id": (IMAGE_DATA, {"INS_404": [], **TRAIN}, "INS_404", "is not in"),
    "malformed": ({**IMAGE_DATA, "INS_7": ins("Q?", "A.", "IMG_E") | {"rel_ins_ids": {"x": 1}}}, None, "INS_7", "rel_ins_ids"),
}


@pytest.mark.parametrize("kind", sorted(BAD_AT_INIT))
def test_bad_records_found_at_init(tmp_path, kind):
    data, train, bad_id, message = BAD_AT_INIT[kind]
    paths = write_subset(tmp_path, data, train=train)
    ds = dataset(group="IMAGE_TEXT", **paths)
    ids = [ds[i].id for i in range(len(ds))]
    assert bad_id not in ids
    expected = [k for k in (train or data) if k != bad_id]
    assert ids == expected
    assert ds.error_report() == {kind: [bad_id]}
    assert ds.summary() == f"mimicit XX_instructions.json: skipped 1 record ({kind} 1): first ids {bad_id}"
    with pytest.raises(VlmkitError, match=message) as error:
        dataset(group="IMAGE_TEXT", on_error="fail", **paths)
    text = str(error.value)
    assert f"'{bad_id}'" in text and "XX_instructions.json" in text and "on_error" in text
    if kind in ("unknown_context_id", "unknown_id"):
        assert "XX_train.json" in text


def test_missing_image_of_an_in_context_example(tmp_path):
    data = {**IMAGE_DATA, "INS_6": ins("What about here?", "Noise again.", ["IMG_GONE"])}
    paths = write_subset(tmp_path, data)
    # same_media: the examples' own images are not used, so nothing is missing for INS_4
    assert dataset(group="IMAGE_TEXT", **paths).error_report() == {"missing_image_id": ["INS_6"]}
    per_example = dataset(group="IMAGE_TEXT", context_mode="per_example", **paths)
    assert per_example.error_report() == {"missing_image_id": ["INS_4", "INS_6"]}
    with pytest.raises(VlmkitError, match="record 'INS_4': in-context example 'INS_6': image id 'IMG_GONE'"):
        dataset(group="IMAGE_TEXT", context_mode="per_example", on_error="fail", **paths)


def test_images_file_missing_is_an_error_under_both_policies(tmp_path):
    paths = write_subset(tmp_path, IMAGE_DATA)
    for policy in ("skip", "fail"):
        with pytest.raises(VlmkitError, match=r"mimicit images: .*XX\.parquet' does not exist"):
            dataset(group="IMAGE_TEXT", on_error=policy, **{**paths, "images": str(tmp_path / "gone" / "XX.parquet")})


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_undecodable_images_skip_to_the_next_record(tmp_path, fmt):
    # IMG_A (INS_1, INS_2, INS_3) is broken; IMG_D (INS_6, the last record) too
    paths = write_subset(tmp_path, IMAGE_DATA, fmt=fmt, values={"IMG_A": "!!!broken!!!", "IMG_D": base64.b64encode(b"\x89PNG nope").decode()})
    ds = dataset(group="IMAGE_TEXT", **paths)
    assert len(ds) == 6 and ds.summary() == ""  # not known before decoding
    assert ds[0].id == "INS_4"  # INS_1..3 -> the following good index
    assert ds.error_report() == {"bad_image": ["INS_1", "INS_2", "INS_3"]}
    assert ds[2].id == "INS_4" and ds[4].id == "INS_5"
    assert ds[5].id == "INS_4"  # INS_6 is bad: wraps around past the known-bad INS_1..3
    assert [ds[i].id for i in range(6)] == ["INS_4"] * 4 + ["INS_5", "INS_4"]  # deterministic
    assert ds.error_report() == {"bad_image": ["INS_1", "INS_2", "INS_3", "INS_6"]}
    assert ds.summary() == (
        "mimicit XX_instructions.json: skipped 4 records (bad_image 4): first ids INS_1, INS_2, INS_3, INS_6"
    )
    # in-context images count too (per_example: INS_4's example INS_6 has IMG_D)
    per_example = dataset(group="IMAGE_TEXT", context_mode="per_example", **paths)
    assert per_example[3].id == "INS_5"
    fail = dataset(group="IMAGE_TEXT", on_error="fail", **paths)
    assert fail[3].id == "INS_4"
    with pytest.raises(VlmkitError) as error:
        fail[0]
    text = str(error.value)
    assert "'INS_1'" in text and "'IMG_A'" in text and str(Path(paths["images"]).name) in text


def test_init_drops_and_decode_skips_reported_together(tmp_path):
    data = {**IMAGE_DATA, "INS_5": ins("And this one?", "", ["IMG_C"])}
    paths = write_subset(tmp_path, data, values={"IMG_B": "@@@"})
    ds = dataset(group="IMAGE_TEXT", **paths)
    # INS_5 has an empty answer, and it is an in-context example of INS_4 and INS_6: all dropped
    assert ds.error_report() == {"empty_answer": ["INS_4", "INS_5", "INS_6"]}
    assert [r.id for r in (ds[i] for i in range(len(ds)))] == ["INS_1", "INS_2", "INS_3"]
    ds2 = dataset(group="IMAGE_TEXT", max_context=0, **paths)
    assert ds2[3].id == "INS_6"  # INS_4 (IMG_B) fails to decode
    assert ds2.error_report() == {"empty_answer": ["INS_5"], "bad_image": ["INS_4"]}
    assert ds2.summary().startswith("mimicit XX_instructions.json: skipped 2 records (empty_answer 1, bad_image 1): ")


def test_all_records_bad(tmp_path):
    paths = write_subset(tmp_path, {"INS_1": ins("Q?", "", ["IMG_A"])})
    with pytest.raises(VlmkitError, match="no usable records.*empty_answer 1"):
        dataset(group="IMAGE_TEXT", **paths)
    paths = write_subset(tmp_path / "b", {"INS_1": ins("Q?", "A.", ["IMG_A"])}, values={"IMG_A": "x"})
    with pytest.raises(VlmkitError, match="no image of .* decodes"):
        dataset(group="IMAGE_TEXT", **paths)[0]


def _touch_record(ds, index, queue):
    queue.put(ds[index].id)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_decode_skips_in_worker_processes_reach_the_parent(tmp_path, method):
    paths = write_subset(tmp_path, IMAGE_DATA, values={"IMG_A": "!!!broken!!!"})
    ds = dataset(group="IMAGE_TEXT", **paths)
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    worker = context.Process(target=_touch_record, args=(ds, 1, queue))
    worker.start()
    assert queue.get(timeout=60) == "INS_4"
    worker.join(timeout=60)
    assert ds.error_report() == {"bad_image": ["INS_2", "INS_3"]}
    # a plain pickle (not a worker) is a snapshot
    copy = pickle.loads(pickle.dumps(ds))
    assert copy[0].id == "INS_4" and copy.error_report() == {"bad_image": ["INS_1", "INS_2", "INS_3"]}
    assert ds.error_report() == {"bad_image": ["INS_2", "INS_3"]}


def test_malformed_records_name_what_is_wrong(tmp_path):
    data = {
        **IMAGE_DATA,
        "INS_7": {"answer": "No question.", "image_ids": ["IMG_E"]},
        "INS_8": ["not", "an", "object"],
        "INS_9": ins("Q?", 42, ["IMG_E"]),
    }
    ds = dataset(group="IMAGE_TEXT", **write_subset(tmp_path, data))
    assert ds.error_report() == {"malformed": ["INS_7", "INS_8", "INS_9"]}
    for rid, message in (("INS_7", "no 'instruction'"), ("INS_8", "is a list"), ("INS_9", "'answer' that is not text")):
        only = {k: v for k, v in data.items() if k in IMAGE_DATA or k == rid}
        with pytest.raises(VlmkitError, match=f"record '{rid}' .*{message}"):
            dataset(group="IMAGE_TEXT", on_error="fail", **write_subset(tmp_path / rid, only))
