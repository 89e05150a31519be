"""The engine's speed switches change nothing a step computes: the frozen encoder's feature cache
(run.cache_features), passes over samples of similar length (run.length_groups) and the row
parameters of embeddings: new_tokens (with checkpoints, resume and export)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tiny import toy_mapping, write_recipe
from vlmkit.core.compose import build_model
from vlmkit.core.data.collate import IGNORE, frame_key, length_groups, split_by_length
from vlmkit.core.engine import run
from vlmkit.core.engine import trainer as trainer_module
from vlmkit.core.engine.features import FeatureCache
from vlmkit.core.engine.state import checkpoint_dirs
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.tuning import NewTokenRows, apply_tuning, embedding_tables, new_token_rows

CAPTIONS = [  # lengths from 1 to ~90 characters: byte-level tokens, so the samples differ a lot in length
    "red",
    "a small blue square on the left",
    "two green circles<|endofchunk|> in a row",  # an added token inside the text: its input row trains
    "a yellow triangle above a large purple circle, next to a thin grey line on the right side",
    "one dot<|endofchunk|>",
    "an orange square and a red circle that touch each other in the middle of the picture",
]
FROZEN = {"encoder": "frozen", "connector": "full", "fusion": "frozen", "decoder": "frozen"}


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """Six pictures with captions of very different lengths (a `captions` dataset)."""
    folder = tmp_path_factory.mktemp("captions")
    entries = []
    for i, caption in enumerate(CAPTIONS):
        image = Image.new("RGB", (32, 32), ((40 * i) % 256, (90 * i) % 256, (150 + 20 * i) % 256))
        image.paste((255 - 30 * i, 20 * i, 60), (4 * i, 4, 4 * i + 10, 20))
        image.save(folder / f"img{i}.png")
        entries.append({"id": f"c{i}", "image": f"img{i}.png", "caption": caption})
    (folder / "captions.json").write_text(json.dumps(entries))
    return folder


def _mapping(captions: Path, *, tune1=None, tune2=None, steps: int = 4, run_opts=None, decoder=None) -> dict:
    data = copy.deepcopy(toy_mapping())
    data["profiles"] = {}
    data.pop("default_profile")
    data["data"] = {"caps": {"type": "captions", "template": "llava_plain", "path": str(captions / "captions.json"),
                             "image_folder": str(captions)}}
    if decoder:
        data["model"]["decoder"]["config"] = decoder
    data["model"]["decoder"]["special_tokens"] = ["<|endofchunk|>"]
    data["stages"] = [
        {"name": "align", "data": ["caps"], "tune": tune1 or dict(FROZEN), "lr": 3e-3, "max_steps": steps, "batch_size": 4},
        {"name": "instruct", "data": ["caps"], "tune": tune2 or dict(FROZEN), "lr": 1e-3, "max_steps": steps,
         "batch_size": 4, "schedule": "cosine"},
    ]
    data["run"] = {"export": False} | (run_opts or {})
    return data


def _run(tmp_path: Path, mapping: dict, name: str):
    path = write_recipe(tmp_path, mapping, f"{name}.yaml")
    return run(load_recipe(path), tmp_path / name, progress=False)


def _losses(result) -> list[float]:
    return [loss for s in result.stages for loss in s.losses]


def _max_diff(a: list[float], b: list[float]) -> float:
    """The largest difference of two loss curves, relative to the loss where it is above 1 (a
    float32 loss of 5.5 is only known to about 5e-7)."""
    assert len(a) == len(b) and a
    return max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ the feature cache
def test_feature_cache_gives_the_same_losses_and_reports_hits(tmp_path, captions):
    off = _run(tmp_path, _mapping(captions, steps=5), "off")
    on = _run(tmp_path, _mapping(captions, steps=5, run_opts={"cache_features": True}), "on")
    assert _max_diff(_losses(off), _losses(on)) <= 1e-6
    assert all(s.feature_cache is None for s in off.stages)
    first, second = (s.feature_cache for s in on.stages)
    # 5 steps of 4 samples over 6 pictures: each encoded once, the rest served from memory
    assert first["misses"] == len(CAPTIONS) and first["hits"] == 5 * 4 - len(CAPTIONS)
    assert second["misses"] == 0 and second["hits"] == 5 * 4  # the encoder stayed frozen: kept across stages
    assert first["bypassed"] == second["bypassed"] == 0
    assert second["entries"] == len(CAPTIONS) and 0 < second["bytes"] <= second["limit_bytes"]


def test_a_stage_that_trains_the_encoder_does_not_use_the_cache(tmp_path, captions, monkeypatch):
    calls: list[int] = []
    original = FeatureCache.encode

    def spy(self, encode, frames, keys):
        calls.append(len(keys))
        return original(self, encode, frames, keys)

    monkeypatch.setattr(FeatureCache, "encode", spy)
    mapping = _mapping(captions, steps=3, run_opts={"cache_features": True})
    mapping["stages"].insert(1, dict(mapping["stages"][0], name="encoder", tune=dict(FROZEN, encoder="full")))
    on = _run(tmp_path, mapping, "on")
    frozen_before, trains, frozen_after = on.stages
    assert trains.feature_cache is None  # the encoder trains: no cache in that stage
    assert sum(calls) == 2 * 3 * 4  # only the frozen stages' frames went through the cache
    # after the encoder trained, nothing computed with its old weights is served: all encoded afresh
    assert frozen_before.feature_cache["entries"] > 0
    assert frozen_after.feature_cache["misses"] == frozen_after.feature_cache["entries"] > 0
    del mapping["run"]["cache_features"]
    off = _run(tmp_path, mapping, "off")
    assert _max_diff(_losses(off), _losses(on)) <= 1e-6


def test_feature_cache_bound_duplicates_and_bypass():
    encoded: list[int] = []

    def encoder(frames):
        encoded.append(frames.shape[0])
        return frames.flatten(1)[:, :8].reshape(-1, 2, 4) * 2

    frames = torch.randn(3, 3, 4, 4)
    keys = [frame_key(f) for f in frames]
    assert len(set(keys)) == 3 and frame_key(frames[0].clone()) == keys[0]
    size = 2 * 4 * 4  # one cached feature: 2 tokens x 4 fp32
    cache = FeatureCache(limit_bytes=2 * size)
    out = cache.encode(encoder, frames[[0, 1, 0]], [keys[0], keys[1], keys[0]])
    assert encoded == [2]  # the repeated frame is encoded once
    torch.testing.assert_close(out, encoder(frames[[0, 1, 0]]), rtol=0, atol=0)
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    cache.encode(encoder, frames[[2]], [keys[2]])  # over the limit: the least recently used goes
    assert cache.evictions == 1 and len(cache) == 2 and cache.bytes == 2 * size
    encoded.clear()
    cache.encode(encoder, frames[[1, 2]], [keys[1], keys[2]])
    assert encoded == [] and cache.hits == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another compute dtype: another entry
        cache.encode(encoder, frames[[1]], [keys[1]])
    assert encoded == [1]
    assert cache.bind("a") is True and len(cache) == 0  # new encoder weights: emptied
    assert cache.bind("a") is False


def test_the_model_encodes_without_the_cache_when_the_encoder_is_in_train_mode(tmp_path, captions):
    path = write_recipe(tmp_path, _mapping(captions))
    model = build_model(load_recipe(path))
    apply_tuning(model, load_recipe(path).recipe.stages[0].tune, "stages.0")
    pixels = torch.randn(1, 2, 1, 3, 32, 32)
    mask = torch.tensor([[True, True]])
    keys = [frame_key(p) for p in pixels[0, :, 0]]
    cache = FeatureCache(2**20)
    model.encoder.train()
    model.encode_media(pixels, mask, cache, keys)
    assert cache.bypassed == 2 and len(cache) == 0
    model.encoder.eval()
    with torch.no_grad():
        plain = model.encode_media(pixels, mask)
        cached = model.encode_media(pixels, mask, cache, keys)
    assert len(cache) == 2
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ length groups
def test_split_by_length_keeps_every_token_and_image():
    assert length_groups([5, 50, 6, 48], 2) == [[0, 2], [3, 1]]
    assert length_groups([40, 41, 42, 40], 3) == [[0, 3, 1, 2]]  # too little to save: one pass
    B, L = 4, 50
    lengths = [5, 50, 6, 48]
    ids = torch.arange(B * L).reshape(B, L)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        labels[b, n - 2 : n] = ids[b, n - 2 : n]
    media = torch.tensor([[True, False], [True, True], [True, False], [True, False]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "vision_x": torch.randn(B, 2, 1, 3, 4, 4),
             "media_mask": media, "ids": ["a", "b", "c", "d"], "frame_keys": ["ka", "kb1", "kb2", "kc", "kd"]}
    parts = split_by_length(batch, 2)
    assert [p["ids"] for p in parts] == [["a", "c"], ["d", "b"]]
    assert [tuple(p["input_ids"].shape) for p in parts] == [(2, 6), (2, 50)]
    assert [p["vision_x"].shape[1] for p in parts] == [1, 2]  # each part keeps its own image count
    assert [p["frame_keys"] for p in parts] == [["ka", "kc"], ["kd", "kb1", "kb2"]]
    assert sum(int(p["attention_mask"].sum()) for p in parts) == sum(lengths)
    trained = sorted(int(x) for p in parts for x in p["labels"][p["labels"] != IGNORE])
    assert trained == sorted(int(x) for x in labels[labels != IGNORE])
    for p in parts:
        for row, name in enumerate(p["ids"]):
            b = "abcd".index(name)
            assert torch.equal(p["vision_x"][row], batch["vision_x"][b, : p["vision_x"].shape[1]])
    assert split_by_length(batch, 1) == [batch]


def test_length_groups_take_the_same_steps(tmp_path, captions):
    tune = dict(FROZEN, decoder={"mode": "partial", "last_layers": 1})
    whole = _run(tmp_path, _mapping(captions, tune2=tune), "whole")
    split = _run(tmp_path, _mapping(captions, tune2=tune, run_opts={"length_groups": 3}), "split")
    assert all(s.passes_per_batch == 1.0 for s in whole.stages)
    assert all(s.passes_per_batch > 1.0 for s in split.stages)  # the captions' lengths differ: it splits
    assert _max_diff(_losses(whole), _losses(split)) <= 1e-6
    a = load_file(str(checkpoint_dirs(tmp_path / "whole")[-1] / "model.safetensors"))
    b = load_file(str(checkpoint_dirs(tmp_path / "split")[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    # AdamW divides by the gradient's running size, so a ~1e-7 difference in a summed gradient
    # moves a weight by a few 1e-6 after 8 steps (see the two-process test of test_engine.py)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 2e-5


# ------------------------------------------------------------------------------ new-token rows
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
NEW_TOKENS = dict(FROZEN, embeddings="new_tokens")


def _masked(monkeypatch):
    """The engine with embeddings: new_tokens as before the row parameters: whole tables trainable
    with a masked gradient."""
    class Masked(trainer_module.StageTuning):
        def __init__(self, tune, where, **kw):
            super().__init__(tune, where, new_token_rows=False)

    monkeypatch.setattr(trainer_module, "StageTuning", Masked)


@pytest.mark.parametrize("decoder", [None, GPT2], ids=["llama_untied", "gpt2_tied"])
def test_new_token_rows_take_the_steps_of_the_masked_tables(tmp_path, captions, monkeypatch, decoder):
    mapping = _mapping(captions, tune1=NEW_TOKENS, tune2=NEW_TOKENS, steps=3, decoder=decoder,
                       run_opts={"checkpoint_every": 1, "keep_last": 100})
    path = write_recipe(tmp_path, mapping)
    initial = build_model(load_recipe(path))
    own = embedding_tables(initial.decoder)
    tables = {n: p.detach().clone() for n, p in initial.named_parameters() if any(p is t for t in own)}
    ids = torch.tensor(initial.decoder.new_token_ids)
    rows = _run(tmp_path, mapping, "rows")
    with monkeypatch.context() as mp:
        _masked(mp)
        masked = _run(tmp_path, mapping, "masked")
    assert _max_diff(_losses(rows), _losses(masked)) <= 1e-5

    # the checkpoints hold the tables under their names, as before; only the optimizer state shrank
    last = {k: checkpoint_dirs(tmp_path / k)[-1] for k in ("rows", "masked")}
    weights = {k: load_file(str(p / "model.safetensors")) for k, p in last.items()}
    assert weights["rows"].keys() == weights["masked"].keys()
    assert {k for k in weights["rows"] if not k.startswith("connector.")} == set(tables)
    width = next(iter(tables.values())).shape[1]
    n_tables = 1 if decoder is GPT2 else 2

    def decoder_moments(folder: Path) -> int:
        """Values of the optimizer state of the decoder's parameters (only the embeddings train there)."""
        groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
        pids = {str(i) for g in groups if g["name"].startswith("decoder") for i in g["params"]}
        state = load_file(str(folder / "optimizer.safetensors"))
        return sum(v.numel() for k, v in state.items() if k.split(".")[0] in pids and v.ndim)

    assert decoder_moments(last["rows"]) == 2 * n_tables * len(ids) * width  # exp_avg, exp_avg_sq of the rows
    assert decoder_moments(last["masked"]) == 2 * sum(t.numel() for t in tables.values())
    old = torch.ones(next(iter(tables.values())).shape[0], dtype=torch.bool)
    old[ids] = False
    for name, start in tables.items():
        a, b = weights["rows"][name], weights["masked"][name]
        assert torch.equal(a[old], start[old]) and torch.equal(b[old], start[old]), name  # bit-identical
        assert not torch.equal(a[ids], start[ids]), name  # the added rows trained
        torch.testing.assert_close(a[ids], b[ids], rtol=0, atol=1e-5)
    assert new_token_rows(rows.model.decoder) is None  # released after the run: a plain model again


def _cut_after(src: Path, dst: Path, global_step: int) -> None:
    """``dst``: the run folder ``src`` as a kill right after checkpoint ``global_step`` left it."""
    shutil.copytree(src, dst)
    for ckpt in checkpoint_dirs(dst):
        if int(ckpt.name.split("-")[1]) > global_step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "export", ignore_errors=True)


def _final(out: Path) -> dict[str, torch.Tensor]:
    last = checkpoint_dirs(out)[-1]
    state = {f"model.{k}": v for k, v in load_file(str(last / "model.safetensors")).items()}
    return state | {f"opt.{k}": v for k, v in load_file(str(last / "optimizer.safetensors")).items()}


def test_new_token_rows_resume_export_and_older_checkpoints(tmp_path, captions, monkeypatch):
    import vlmkit

    mapping = _mapping(captions, tune1=NEW_TOKENS, tune2=NEW_TOKENS, steps=3,
                       run_opts={"checkpoint_every": 1, "keep_last": 100, "export": True})
    path = write_recipe(tmp_path, mapping)
    ref = run(load_recipe(path), tmp_path / "ref", progress=False)
    expected = _final(tmp_path / "ref")
    assert not any("new_token_rows" in k for k in expected)  # the format of before: tables, no row parameters
    for cut in (2, 4):  # between the stages, and in the middle of the second
        _cut_after(tmp_path / "ref", tmp_path / f"cut{cut}", cut)
        resumed = run(load_recipe(path), tmp_path / f"cut{cut}", progress=False)
        assert resumed.resumed_from is not None
        got = _final(tmp_path / f"cut{cut}")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"resume after step {cut} differs"

    # the export holds the trained tables; the loaded model computes what the trained one does
    loaded = vlmkit.load(tmp_path / "ref" / "export")
    table = "decoder.model.model.embed_tokens.weight"
    assert torch.equal(loaded.state_dict()[table], expected[f"model.{table}"])
    assert torch.equal(ref.model.state_dict()[table], expected[f"model.{table}"])

    # a mid-stage checkpoint with whole-table moments (embeddings new_tokens before the row
    # parameters) resumes: the rows' moments are cut from the tables'
    with monkeypatch.context() as mp:
        _masked(mp)
        run(load_recipe(path), tmp_path / "masked", progress=False)
    old_moments = load_file(str(checkpoint_dirs(tmp_path / "masked")[4 - 1] / "optimizer.safetensors"))
    assert max(v.shape[0] for v in old_moments.values() if v.ndim == 2) == ref.model.decoder.get_input_embeddings().num_embeddings
    _cut_after(tmp_path / "masked", tmp_path / "old", 4)
    resumed = run(load_recipe(path), tmp_path / "old", progress=False)
    masked = json.loads((checkpoint_dirs(tmp_path / "masked")[-1] / "trainer.json").read_text())["losses"]
    assert _max_diff(_losses(resumed), [x for s in masked.values() for x in s]) <= 1e-5
    a, b = _final(tmp_path / "old"), _final(tmp_path / "masked")
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("model.")) <= 1e-5


def test_row_parameters_are_views_of_the_tables(tmp_path, captions):
    path = write_recipe(tmp_path, _mapping(captions, tune1=NEW_TOKENS))
    model = build_model(load_recipe(path))
    report = apply_tuning(model, load_recipe(path).recipe.stages[0].tune, "stages.0").report
    dec = model.decoder
    rows = new_token_rows(dec)
    assert isinstance(rows, NewTokenRows) and rows.runs == [(min(dec.new_token_ids), max(dec.new_token_ids) + 1)]
    assert report["embeddings"]["trainable"] == sum(p.numel() for p in rows.parameters())
    table = dec.get_input_embeddings().weight
    assert not table.requires_grad and all(p.requires_grad for p in rows.parameters())
    assert not any("new_token_rows" in k for k in model.state_dict())
    with torch.no_grad():
        rows.input_0.add_(1.0)  # a step on the rows is a step on the table
    assert torch.equal(table[rows.runs[0][0]: rows.runs[0][1]], rows.input_0)
    embed = dec.get_input_embeddings()
    before = embed(torch.tensor([[1, rows.runs[0][0]]]))
    model.to(torch.device("cpu", 0))  # copies every tensor (as accelerate's prepare on several CPU processes)
    with pytest.raises(RuntimeError, match="no longer views"):
        embed(torch.tensor([[1, 2]]))
    param = rows.input_0
    rows.rebind()  # the same Parameter, pointed at the moved table's rows again
    assert rows.input_0 is param and rows.input_0.data_ptr() == table.data_ptr() + rows.runs[0][0] * table.stride(0) * 4
    torch.testing.assert_close(embed(torch.tensor([[1, rows.runs[0][0]]])), before, rtol=0, atol=0)
    model.decoder.to(torch.float64)  # views broken: the next forward says so instead of training a copy
    with pytest.raises(RuntimeError, match="no longer views"):
        dec.get_input_embeddings()(torch.tensor([[1, 2]]))


def test_two_processes_with_the_switches_take_the_same_steps_as_one(tmp_path, captions):
    """accelerate launch (ddp config, 2 gloo processes on the CPU) with the row parameters, the
    feature cache and length groups: the row parameters' gradients are averaged like any other."""
    import os
    import subprocess
    import sys

    from vlmkit.launch import path as launch_config

    mapping = _mapping(captions, tune1=NEW_TOKENS, tune2=NEW_TOKENS, steps=2,
                       run_opts={"cache_features": True, "length_groups": 2})
    for stage in mapping["stages"]:
        stage["optimizer"] = {"eps": 1.0e-6}  # as test_engine's two-process test: compare steps, not eps noise
    path = write_recipe(tmp_path, mapping, "ddp.yaml")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cli = ["-m", "vlmkit.core.cli", "run", str(path), "--no-progress"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config("ddp")),
              "--num_processes", "2"]
    for name, command in (("two", launch), ("one", [sys.executable])):
        done = subprocess.run([*command, *cli, "--output-dir", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(checkpoint_dirs(tmp_path / "one")[-1] / "model.safetensors"))
    b = load_file(str(checkpoint_dirs(tmp_path / "two")[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and any("embed_tokens" in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
