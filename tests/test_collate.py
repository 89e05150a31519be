"""Collation: exact labels, video frames, truncation that drops whole in-context examples; the
mixed-dataset sampler: one dataset per micro-batch, deterministic and resumable."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.core.data.collate import IGNORE, Collator
from vlmkit.core.engine.sampler import StageBatchSampler
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Preprocess, Sample
from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer

PRE = Preprocess(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _tok():
    tok = byte_level_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def _img(v: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (v, v, v))


def _incontext() -> Sample:
    # two in-context examples, then the query; each example is a unit that truncation may drop
    segs = [("<image>Q1 ", False), ("A1;", True), ("<image>Q2 ", False), ("A2;", True), ("<image>Q ", False), ("A", True)]
    return Sample("s", images=[_img(10), _img(20), _img(30)], segments=segs, units=[(0, 2, 0, 1), (2, 4, 1, 2)])


def _supervised(tok, batch, b=0) -> str:
    ids = batch["input_ids"][b][batch["labels"][b] != IGNORE]
    return tok.decode(ids)


def test_labels_are_exactly_the_trained_segments_and_no_eos_is_added():
    tok = _tok()
    batch = Collator(tok, PRE, "<image>", 3)([_incontext()])
    assert _supervised(tok, batch) == "A1;A2;A"
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 9
    assert batch["vision_x"].shape == (1, 3, 1, 3, 8, 8)


def test_truncation_drops_whole_examples_from_the_front_and_counts():
    tok = _tok()
    full = len(Collator(tok, PRE, "<image>", 3).encode(_incontext())[0])
    col = Collator(tok, PRE, "<image>", 3, max_length=full - 1)
    batch = col([_incontext()])
    assert _supervised(tok, batch) == "A2;A"  # the oldest example went, whole
    assert batch["media_mask"].tolist() == [[True, True]]
    assert torch.equal(batch["vision_x"][0, 0, 0], torch.full((3, 8, 8), 20 / 255))  # the second image is first now
    assert col.stats["dropped_examples"] == 1 and col.stats["truncated_samples"] == 1
    short = Collator(tok, PRE, "<image>", 3, max_length=8)
    other = Sample("ok", images=[], segments=[("q", False), ("a", True)])
    batch = short([_incontext(), other])
    assert batch["ids"] == ["ok"] and short.stats["dropped_samples"] == 1 and short.dropped_ids == ["s"]
    with pytest.raises(VlmkitError, match="max_length 8"):
        short([_incontext()])


def test_video_frames_and_frame_dependent_placeholders():
    tok = _tok()
    clip = Sample("v", images=[[_img(1), _img(2), _img(3), _img(4)]], segments=[("<image>move?", False), ("left", True)])
    col = Collator(tok, PRE, "<image>", lambda frames: 2 * frames)
    batch = col([clip])
    assert batch["vision_x"].shape == (1, 1, 4, 3, 8, 8)
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 8
    still = Sample("i", images=[_img(5)], segments=[("<image>", False), ("x", True)])
    with pytest.raises(VlmkitError, match="mixes media of \\[1, 4\\] frames"):
        col([clip, still])


def test_left_padding_puts_real_tokens_last():
    tok = _tok()
    a = Sample("a", segments=[("hello", False), ("!", True)])
    b = Sample("b", segments=[("hi", False), ("!", True)])
    batch = Collator(tok, PRE, "<image>", 1, padding_side="left")([a, b])
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1]
    assert tok.decode(batch["input_ids"][1][-3:]) == "hi!"


def test_mixed_sampler_one_dataset_per_batch_by_size_and_by_weights():
    sizes = [40, 120]
    s = StageBatchSampler(sizes, 4, seed=1, stage_index=0)
    it = iter(s)
    batches = [next(it) for _ in range(400)]
    from_first = [all(i < 40 for i in b) for b in batches]
    assert all(f or all(i >= 40 for i in b) for f, b in zip(from_first, batches)), "one dataset per micro-batch"
    share = sum(from_first) / len(batches)
    assert 0.18 < share < 0.32  # 40 / 160 = 0.25 by size
    w = iter(StageBatchSampler(sizes, 4, seed=1, stage_index=0, weights=[3.0, 1.0]))
    share_w = sum(all(i < 40 for i in next(w)) for _ in range(400)) / 400
    assert 0.68 < share_w < 0.82  # 3 : 1 by weight
    # each dataset is covered once per epoch, in its own permutation
    first = [b for b in batches if all(i < 40 for i in b)][:10]
    assert sorted(i for b in first for i in b) == list(range(40))


def test_mixed_sampler_resumes_and_splits_over_processes():
    sizes = [12, 30]
    whole = iter(StageBatchSampler(sizes, 4, seed=3, stage_index=2))
    seq = [next(whole) for _ in range(30)]
    resumed = iter(StageBatchSampler(sizes, 4, seed=3, stage_index=2, start=17))
    assert [next(resumed) for _ in range(13)] == seq[17:]
    r0 = iter(StageBatchSampler(sizes, 4, seed=3, stage_index=2, rank=0, world_size=2))
    r1 = iter(StageBatchSampler(sizes, 4, seed=3, stage_index=2, rank=1, world_size=2))
    for full in seq[:10]:
        assert next(r0) + next(r1) == full
    with pytest.raises(VlmkitError, match="more than the 12 samples of dataset 'small'"):
        StageBatchSampler(sizes, 16, seed=0, stage_index=0, names=["small", "big"])
