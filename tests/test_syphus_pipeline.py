"""The Syphus pipeline end to end against a stub OpenAI server on 127.0.0.1: MIMIC-IT output read
back by the mimicit dataset, every reject counted and kept, a killed run resumed from the cache with
no repeated call, bad input named, task files checked, translations, and a smoke recipe training on
the generated data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from syphus_stub import StubServer
from vlmkit.core.errors import VlmkitError
from vlmkit.llm_backends.openai_compatible import OpenAICompatibleBackend, OpenAICompatibleConfig
from vlmkit.syphus.pipeline import GenerateConfig, generate
from vlmkit.syphus.task import load_task, shipped_tasks

ROOT = Path(__file__).resolve().parents[1]
#: the checkout first, then whatever path the tests themselves were given
PYTHONPATH = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
NO_SIMILARITY = GenerateConfig.model_validate({"linking": {"similarity": "none", "similar": 0}})
COLOURS = {"a": ("red", "circle"), "b": ("blue", "square"), "c": ("green", "triangle"), "d": ("red", "square"),
           "e": ("yellow", "circle"), "f": ("purple", "star")}


def _labels(text: str) -> list[str]:
    return re.findall(r"^- (\w+ \w+) \[", text, re.MULTILINE)


def scripted(messages):
    """Answers the way a good LLM would, from the item's objects, except for scripted mistakes."""
    last = messages[-1]["content"]
    if "translator" in messages[0]["content"]:
        q, a = re.findall(r"(?:Question|Answer): (.*)", last)
        return f"Question: [es] {q}\nAnswer: [es] {a}"
    labels = _labels(last)
    colour, shape = labels[0].split()
    if "yellow circle" in labels:
        return "I am sorry, I cannot see pictures."           # unparseable
    pairs = [(f"What colour is the {shape} here?", f"The {shape} is {colour}."),
             (f"How many objects does the picture show?", f"It shows {len(labels)} objects."),
             (f"How many objects does this picture show?", f"It shows {len(labels)} objects."),  # near-duplicate
             (f"Is there a star in the picture at all?", "Yes, there is a star.")]                  # ungrounded but for f
    return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs)


def make_annotations(folder: Path, extra_lines: list[str] = ()) -> Path:
    (folder / "img").mkdir(parents=True)
    lines = []
    for key, (colour, shape) in COLOURS.items():
        Image.new("RGB", (64, 48), (10 * len(key), 100, 200)).save(folder / "img" / f"{key}.png")
        lines.append(json.dumps({"id": f"item_{key}", "media": [f"img/{key}.png"],
                                 "captions": [f"a {colour} {shape} in the middle"],
                                 "boxes": [[f"{colour} {shape}", 10, 10, 30, 30], ["grey square", 0, 0, 5, 5]]}))
    lines += list(extra_lines)
    path = folder / "annotations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def openai_backend(url, **kw):
    return OpenAICompatibleBackend(OpenAICompatibleConfig(base_url=url, model="stub", backoff_s=0.0, **kw))


def test_generated_pairs_filters_and_rejects_are_exact_and_the_mimicit_dataset_reads_them(tmp_path):
    from vlmkit.datasets.mimicit import MimicIT, MimicITConfig

    bad_lines = ['{"id": "broken", "media": ["img/a.png"]', json.dumps({"id": "nomedia", "media": ["img/zz.png"],
                 "captions": ["x"]}), json.dumps({"id": "typo", "media": ["img/a.png"], "captoins": ["x"]})]
    ann = make_annotations(tmp_path, bad_lines)
    task = load_task("llava_conversation")
    with StubServer(scripted) as stub:
        result = generate(task, ann, tmp_path / "out", openai_backend(stub.url, concurrency=2),
                          config=NO_SIMILARITY, languages=["es"], progress=False)
    out = tmp_path / "out"
    # 6 items asked, item_e's answer unparseable; of each other item's four pairs: 1 kept, 2 kept for item_a and
    # an exact duplicate of it after, 3 a near-duplicate of 2, 4 (a star) ungrounded but for item_f, which has one
    assert result.items == 6 and result.parsed_items == 5
    assert result.calls == 6 + result.pairs and result.cached == 0
    rejects = [json.loads(line) for line in (out / "CONV_rejects.jsonl").read_text().splitlines()]
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r.get("item") or r.get("id"))
    assert by_reason["parse_failure"] == ["item_e"]
    assert by_reason["bad_annotation"] == [None, "typo"]
    assert by_reason["missing_media"] == ["nomedia"]
    assert by_reason["near_duplicate"] == ["item_a", "item_b", "item_c", "item_d", "item_f"]
    assert by_reason["duplicate"] == ["item_b", "item_c", "item_d", "item_f"]
    assert by_reason["ungrounded"] == ["item_a", "item_b", "item_c", "item_d"]
    assert result.rejects == {k: len(v) for k, v in sorted(by_reason.items())}
    assert "names star" in [r for r in rejects if r["reason"] == "ungrounded"][0]["problem"]
    assert "captoins" in [r for r in rejects if r["item"] == "typo"][0]["problem"]

    data = json.loads((out / "CONV_instructions.json").read_text())
    assert set(data) == {"meta", "data"} and data["meta"]["task"] == "llava_conversation"
    records = data["data"]
    kept = [(r["instruction"], r["answer"]) for r in records.values()]
    assert kept == [("What colour is the circle here?", "The circle is red."),
                    ("How many objects does the picture show?", "It shows 2 objects."),
                    ("What colour is the square here?", "The square is blue."),
                    ("What colour is the triangle here?", "The triangle is green."),
                    ("What colour is the square here?", "The square is red."),
                    ("What colour is the star here?", "The star is purple."),
                    ("Is there a star in the picture at all?", "Yes, there is a star.")]
    assert list(records) == [f"CONV_INS_{i:05d}" for i in range(1, 8)]
    assert records["CONV_INS_00001"]["image_ids"] == ["CONV_IMG_item_a"]
    assert records["CONV_INS_00001"]["rel_ins_ids"] == ["CONV_INS_00002"]   # same media only (similarity off)
    assert records["CONV_INS_00006"]["rel_ins_ids"] == ["CONV_INS_00007"]
    train = json.loads((out / "CONV_train.json").read_text())
    assert train == {k: v["rel_ins_ids"] for k, v in records.items()}

    es = json.loads((out / "CONV_instructions_es.json").read_text())
    assert es["meta"]["language"] == "es" and list(es["data"]) == list(records)   # the original ids
    assert es["data"]["CONV_INS_00003"]["instruction"] == "[es] What colour is the square here?"
    assert es["data"]["CONV_INS_00003"]["image_ids"] == ["CONV_IMG_item_b"]

    ds = MimicIT(MimicITConfig(instructions=out / "CONV_instructions.json", images=out / "CONV.parquet",
                               train_config=out / "CONV_train.json", group="IMAGE_TEXT", on_error="fail"))
    assert len(ds) == 7
    record = ds[0]
    assert record.query.turns[0].text == "What colour is the circle here?"
    assert record.query.turns[1].text == "The circle is red."
    assert [t.text for c in record.context for t in c.turns] == ["How many objects does the picture show?",
                                                                 "It shows 2 objects."]
    assert record.query.media[0].frames[0].size == (224, 224)      # stored at 224 x 224
    ds_es = MimicIT(MimicITConfig(instructions=out / "CONV_instructions_es.json", images=out / "CONV.parquet",
                                  train_config=out / "CONV_train_es.json", group="IMAGE_TEXT", on_error="fail"))
    assert len(ds_es) == 7 and ds_es[2].query.turns[1].text == "[es] The square is blue."


def test_a_rerun_is_answered_from_the_cache_and_a_changed_backend_setting_is_not(tmp_path):
    ann = make_annotations(tmp_path)
    task = load_task("la_short_answers")
    with StubServer(scripted) as stub:
        first = generate(task, ann, tmp_path / "out", openai_backend(stub.url), config=NO_SIMILARITY, progress=False)
        again = generate(task, ann, tmp_path / "out", openai_backend(stub.url), config=NO_SIMILARITY, progress=False)
        assert stub.received == 6
        hotter = generate(task, ann, tmp_path / "out", openai_backend(stub.url, temperature=0.7),
                          config=NO_SIMILARITY, progress=False)
        assert stub.received == 12
    assert (first.calls, first.cached, again.calls, again.cached, hotter.calls) == (6, 0, 0, 6, 6)
    assert (tmp_path / "out" / "LA_instructions.json").read_text().count("INS_") > 0


def _cli(*args):
    return [sys.executable, "-m", "vlmkit.core.cli", *map(str, args)]


def test_a_killed_run_resumes_from_the_cache_without_asking_any_prompt_twice(tmp_path):
    ann = make_annotations(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"linking": {"similarity": "none", "similar": 0}}))
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}

    def command(url):
        return _cli("data", "generate", "llava_conversation", "--annotations", ann, "--out", tmp_path / "out",
                    "--backend", "openai_compatible", "--backend-option", f"base_url={url}",
                    "--backend-option", "model=stub", "--backend-option", "concurrency=1",
                    "--config", config, "--languages", "es", "--no-progress")

    with StubServer(scripted, hang_after=4) as stub:              # 4 answers, then the 5th request hangs
        proc = subprocess.Popen(command(stub.url), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert stub.hanging.wait(120), proc.communicate(timeout=5)[0]
        os.kill(proc.pid, signal.SIGKILL)                        # killed mid-run
        proc.wait(30)
        first_answered = stub.answered
    assert first_answered == 4
    assert not (tmp_path / "out" / "CONV_instructions.json").exists()

    with StubServer(scripted) as stub2:
        done = subprocess.run(command(stub2.url), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    # 6 items + one translation per kept pair; the 4 answered before the kill are never asked again
    data = json.loads((tmp_path / "out" / "CONV_instructions.json").read_text())["data"]
    total = 6 + len(data)
    assert stub2.received == stub2.answered == total - 4
    assert max(stub2.answered_prompts.values()) == 1
    assert "4 from the cache" in done.stdout


def test_bad_input_is_named(tmp_path):
    ann = make_annotations(tmp_path)
    task_file = tmp_path / "task.yaml"
    raw = yaml.safe_load(shipped_tasks()["llava_conversation"].read_text())
    task_file.write_text(yaml.safe_dump({**raw, "temprature": 0.5}))
    with pytest.raises(VlmkitError, match=r"task file .*task.yaml: temprature: unknown field"):
        load_task(task_file)
    task_file.write_text(yaml.safe_dump({**raw, "prompt": "Objects: {object}"}))
    with pytest.raises(VlmkitError, match=r"prompt: .*unknown placeholder '\{object\}'; did you mean 'objects'"):
        load_task(task_file)
    task_file.write_text(yaml.safe_dump({**raw, "examples": [{"annotation": {"captions": ["x"]}, "answer": "no markers"}]}))
    with pytest.raises(VlmkitError, match=r"examples.0.answer does not parse"):
        load_task(task_file)
    task_file.write_text(yaml.safe_dump({**raw, "output": {**raw["output"], "questoin_marker": "Q:"}}))
    with pytest.raises(VlmkitError, match=r"output.questoin_marker: unknown field; did you mean 'question_marker'"):
        load_task(task_file)
    with pytest.raises(VlmkitError, match="neither a shipped task; did you mean 'llava_detail'"):
        load_task("llava_detial")
    task = load_task("llava_conversation")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "mine.txt").write_text("keep")
    with pytest.raises(VlmkitError, match="is not empty and is not a Syphus output folder"):
        generate(task, ann, tmp_path / "occupied", None, dry_run=True)
    assert (tmp_path / "occupied" / "mine.txt").read_text() == "keep"
    with pytest.raises(VlmkitError, match="unknown xx; allowed: zh, ja, es, de, fr, ko, ar"):
        generate(task, ann, tmp_path / "o2", None, dry_run=True, languages=["xx"])
    with pytest.raises(ValueError, match="similar > 0 needs similarity: embeddings"):
        GenerateConfig.model_validate({"linking": {"similarity": "none"}})
    # the CLI turns them into one line and exit 2
    done = subprocess.run(_cli("data", "generate", task_file, "--annotations", ann, "--out", tmp_path / "o3", "--dry-run"),
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert done.returncode == 2 and done.stderr.startswith("error: task file") and "Traceback" not in done.stderr
    # a dry run still checks the backend's name and options (and loads nothing)
    done = subprocess.run(_cli("data", "generate", "llava_conversation", "--annotations", ann, "--out", tmp_path / "o4",
                               "--dry-run", "--backend-option", "batch_sise=4"),
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert done.returncode == 2 and "backend transformers: batch_sise" in done.stderr and "Traceback" not in done.stderr


def test_undecodable_lines_bad_numbers_and_unreadable_media_are_counted_rejects_naming_the_item(tmp_path):
    ann = make_annotations(tmp_path, [json.dumps({"id": "nan_box", "media": ["img/a.png"], "captions": ["x"],
                                                  "boxes": [["red circle", float("nan"), 0, 1, 1]]})])
    with ann.open("ab") as f:
        f.write(b'{"id": "latin1", "media": ["img/a.png"], "captions": ["caf\xe9"]}\n')
    (tmp_path / "img" / "g.png").write_bytes(b"not a png")
    with ann.open("a") as f:
        f.write(json.dumps({"id": "item_g", "media": ["img/g.png"], "captions": ["an orange circle"],
                            "boxes": [["orange circle", 1, 1, 9, 9]]}) + "\n")
    task = load_task("llava_conversation")
    dry = generate(task, ann, tmp_path / "dry", None, dry_run=True)
    rejects = [json.loads(x) for x in (tmp_path / "dry" / "CONV_rejects.jsonl").read_text().splitlines()]
    assert dry.rejects == {"bad_annotation": 2} and dry.items == 7
    assert [(r["item"], r["where"].rsplit(":", 1)[1]) for r in rejects] == [("nan_box", "7"), (None, "8")]
    assert "not UTF-8" in rejects[1]["problem"] and "boxes" in rejects[0]["problem"]
    with StubServer(scripted) as stub:
        result = generate(task, ann, tmp_path / "out", openai_backend(stub.url), config=NO_SIMILARITY, progress=False)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "CONV_rejects.jsonl").read_text().splitlines()]
    bad_media = [r for r in rejects if r["reason"] == "bad_media"]
    assert bad_media and {r["item"] for r in bad_media} == {"item_g"} and "not a readable image" in bad_media[0]["problem"]
    data = json.loads((tmp_path / "out" / "CONV_instructions.json").read_text())["data"]
    assert all("item_g" not in "".join(r["image_ids"]) for r in data.values()) and result.rejects["bad_media"] == len(bad_media)
    # a repeated id is an error naming both lines
    with ann.open("a") as f:
        f.write(json.dumps({"id": "item_a", "media": ["img/a.png"], "captions": ["again"]}) + "\n")
    with pytest.raises(VlmkitError, match=r"annotations.jsonl:10: id 'item_a' repeats line 1"):
        generate(task, ann, tmp_path / "dry2", None, dry_run=True)


def test_dry_run_renders_prompts_and_calls_nothing(tmp_path):
    ann = make_annotations(tmp_path)
    result = generate(load_task("llava_detail"), ann, tmp_path / "out", None, dry_run=True, limit=2)
    lines = [json.loads(x) for x in (tmp_path / "out" / "DETAIL_prompts.jsonl").read_text().splitlines()]
    assert [x["item"] for x in lines] == ["item_a", "item_b"] and result.items == 2
    user = lines[0]["messages"][-1]["content"]
    assert user == "Description:\n- a red circle in the middle\nObjects:\n- red circle [10, 10, 30, 30]\n- grey square [0, 0, 5, 5]"
    assert [m["role"] for m in lines[0]["messages"]] == ["system", "user", "assistant", "user"]
    assert not (tmp_path / "out" / "cache").exists()


def test_every_shipped_task_loads_and_its_examples_parse():
    assert set(shipped_tasks()) >= {"llava_conversation", "llava_detail", "llava_complex_reasoning",
                                    "la_short_answers", "dc_clip_events"}
    groups = {name: load_task(name).group for name in shipped_tasks()}
    assert groups["dc_clip_events"] == "VIDEO_TEXT" and groups["la_short_answers"] == "IMAGE_TEXT"


def test_demo_annotations_and_a_smoke_recipe_trains_on_generated_image_and_video_data(tmp_path):
    from vlmkit.demo import data as demo
    from vlmkit.core.engine import run
    from vlmkit.core.recipe.loader import load_recipe
    from vlmkit.syphus.demo_annotations import write_demo_annotations

    demo_dir = tmp_path / "demo"
    demo.write_demo_data(demo_dir, size="tiny")
    counts = write_demo_annotations(demo_dir, tmp_path / "ann")
    assert counts == {"items": 32, "scenes": 24, "clips": 8, "frames": 32}
    items = [json.loads(x) for x in (tmp_path / "ann" / "annotations.jsonl").read_text().splitlines()]
    clip = items[-1]
    assert len(clip["media"]) == 4 and clip["timestamps"] == [0.0, 1.0, 2.0, 3.0]
    assert all((tmp_path / "ann" / m).is_file() for m in clip["media"])

    def answer(messages):
        labels = _labels(messages[-1]["content"]) or [" ".join(re.findall(r"a (\w+ \w+) moves", messages[-1]["content"])[0].split()[:2])]
        colour, shape = labels[0].split()
        return f"Question: What colour is the {shape} in view?\nAnswer: It is {colour}."

    with StubServer(answer) as stub:
        for name in ("la_short_answers", "dc_clip_events"):
            generate(load_task(name), tmp_path / "ann" / "annotations.jsonl", tmp_path / "gen",
                     openai_backend(stub.url, concurrency=4), config=NO_SIMILARITY, progress=False)
    g = tmp_path / "gen"
    dc = json.loads((g / "DC_instructions.json").read_text())["data"]
    report = json.loads((g / "DC_report.json").read_text())
    assert report["pairs"] == len(dc) and len(dc) + report["rejects"].get("duplicate", 0) == 8   # one pair per clip
    assert next(iter(dc.values()))["image_ids"][-1].endswith("_0003")
    overrides = [f"data.images.instructions={g / 'LA_instructions.json'}", f"data.images.images={g / 'LA.parquet'}",
                 f"data.images.train_config={g / 'LA_train.json'}",
                 f"data.in_context.instructions={g / 'LA_instructions.json'}", f"data.in_context.images={g / 'LA.parquet'}",
                 f"data.in_context.train_config={g / 'LA_train.json'}",
                 f"data.video.instructions={g / 'DC_instructions.json'}", f"data.video.images={g / 'DC.parquet'}",
                 f"data.video.train_config={g / 'DC_train.json'}"]
    resolved = load_recipe("otter_mimicit", "smoke", overrides)
    result = run(resolved, tmp_path / "run", progress=False)
    instruct = result.stages[-1]
    assert instruct.steps == 3 and all(l == l for l in instruct.losses)   # finite, trained on the generated files


def test_the_readme_section_names_only_real_flags_and_valid_configs():
    import argparse

    from vlmkit.core.cli import _parser

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Data generation: Syphus")
    section = text[start:text.index("\n## ", start + 1)]

    def subparsers(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    data = subparsers(subparsers(_parser())["data"])
    known = {flag for name in ("generate", "annotate-demo", "tasks") for a in data[name]._actions
             for flag in a.option_strings}
    assert set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", section)) <= known
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    config = next(b for b in blocks if b.startswith("# config.yaml"))
    GenerateConfig.model_validate(yaml.safe_load(config))
    openai = next(b for b in blocks if b.startswith("# openai.yaml"))
    OpenAICompatibleConfig.model_validate(yaml.safe_load(openai))
    options = set(re.findall(r"`(\w+)` \(\d", section))   # "`batch_size` (8)": an option with its default
    fields = (set(OpenAICompatibleConfig.model_fields) | set(load_task.__globals__["Task"].model_fields)
              | set(GenerateConfig.model_fields["filters"].annotation.model_fields)
              | set(GenerateConfig.model_fields["linking"].annotation.model_fields))
    from vlmkit.llm_backends.transformers import TransformersBackendConfig
    assert len(options) > 8 and options <= fields | set(TransformersBackendConfig.model_fields), options - fields
