"""The few-shot evaluation: CIDEr-D against the COCO caption evaluation's value, VQA accuracy and
its normalisation on hand-written answers, and the fewshot evaluator's prompts (text-only 0-shot,
RICES order), classification by normalised log-likelihood and captioning scores."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmkit.core.compose import build_model
from vlmkit.datasets.class_folders import ClassFolders, ClassFoldersConfig
from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.core.errors import VlmkitError
from vlmkit.evaluators import fewshot as fewshot_module
from vlmkit.evaluators.fewshot import FewShotConfig, FewShotEvaluator
from vlmkit.core.evaluation.scoring import cider_d, vqa_accuracy, vqa_normalize
from vlmkit.core.interfaces import EvalContext
from vlmkit.core.recipe.loader import load_recipe

GTS = {"1": ["a red circle on the left", "a red ball at left"], "2": ["two blue squares", "a pair of blue squares"],
       "3": ["a yellow triangle above a green square", "yellow triangle over green square"]}
RES = {"1": "a red circle at the left", "2": "blue squares", "3": "a green square under a yellow triangle"}


def test_cider_d_equals_the_coco_caption_evaluation():
    # pycocoevalcap 1.2, Cider().compute_score(GTS, {k: [v] for k, v in RES.items()}) on these captions
    score, per_item = cider_d(RES, GTS)
    assert score == pytest.approx(3.378986463872, abs=1e-9)
    assert per_item["1"] == pytest.approx(3.1651130764667332, abs=1e-9)
    assert per_item["2"] == pytest.approx(3.2098205928725547, abs=1e-9)
    assert per_item["3"] == pytest.approx(3.7620257222767117, abs=1e-9)
    with pytest.raises(ValueError, match="same"):
        cider_d({"1": "x"}, {"2": ["x"]})


def test_vqa_accuracy_and_normalisation():
    assert vqa_normalize("The Two dogs.") == "2 dogs" and vqa_normalize("1,000") == "1000" and vqa_normalize("3.5") == "3.5"
    ten = ["2"] * 3 + ["3"] * 7
    # leave-one-out over 10 answers: 3 subsets keep two "2"s (2/3), 7 keep three (1): 0.9
    assert vqa_accuracy("two", ten) == pytest.approx(0.9)
    assert vqa_accuracy("3", ten) == pytest.approx(1.0)
    assert vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("A dog", ["dog"]) == 1.0 and vqa_accuracy("cat", ["dog"]) == 0.0


def _record(rid, colour, answer, question="What is it?"):
    img = Image.new("RGB", (32, 32), colour)
    return Record(id=rid, query=Exchange([Turn("user", question), Turn("assistant", answer)], [Media(rid, [img])]))


COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
           "black": (5, 5, 5), "yellow": (230, 220, 10)}


@pytest.fixture(scope="module")
def model():
    return build_model(load_recipe("otter_mimicit", "smoke")).eval()


def _context(tmp_path, support, query):
    return EvalContext(datasets={"support": support, "query": query}, templates={}, output_dir=tmp_path, progress=False)


def test_zero_shot_shows_two_text_only_demonstrations(model, tmp_path, monkeypatch):
    support = [_record(f"s{i}", c, f"a {n} square") for i, (n, c) in enumerate(COLOURS.items())]
    query = [_record("q0", COLOURS["red"], "a red square")]
    seen = []

    def fake(model, prompts, template, **kwargs):
        seen.extend(prompts)
        assert template.stop_tokens == ("<|endofchunk|>",)
        assert kwargs["num_beams"] == 3 and kwargs["max_new_tokens"] == 20
        return ["a red square"] * len(prompts)

    monkeypatch.setattr(fewshot_module, "generate", fake)
    cfg = FewShotConfig(task="captioning", support="support", query="query", shots=[0, 4])
    result = FewShotEvaluator(cfg).evaluate(model, _context(tmp_path, support, query))
    zero, four = seen
    text0 = "".join(t for t, _ in zero.segments)
    assert len(zero.images) == 1 and text0.count("<image>") == 1 and text0.count("Output:") == 3
    assert text0.endswith("<image>Output:") and text0.count("<|endofchunk|>") == 2
    assert len(four.images) == 5 and "".join(t for t, _ in four.segments).count("<image>") == 5
    assert result.metrics["0 shots"] == result.metrics["4 shots"] == 0.0  # one item: every n-gram's IDF is log(1/1) = 0
    assert result.name == "fewshot_captioning" and result.curves["CIDEr-D"] == {"0": 0.0, "4": 0.0}


def test_rices_puts_the_most_similar_demonstration_last(model, tmp_path, monkeypatch):
    support = [_record(f"s{i}", c, n) for i, (n, c) in enumerate(COLOURS.items())]
    query = [_record("q-blue", COLOURS["blue"], "blue"), _record("q-yellow", COLOURS["yellow"], "yellow")]
    seen = []
    monkeypatch.setattr(fewshot_module, "generate", lambda m, p, t, **k: seen.extend(p) or ["blue", "x"])
    cfg = FewShotConfig(task="vqa", support="support", query="query", shots=[3], demos="rices")
    result = FewShotEvaluator(cfg).evaluate(model, _context(tmp_path, support, query))
    for prompt, colour in zip(seen, ("blue", "yellow")):
        last_demo = prompt.images[-2]  # the query's picture is the last image
        assert last_demo.getpixel((0, 0)) == COLOURS[colour]
        assert "Question:What is it? Short answer:" in "".join(t for t, _ in prompt.segments)
    assert result.metrics["3 shots"] == 0.5  # "blue" right, "x" wrong


def test_classification_ranks_classes_by_mean_log_probability(model, tmp_path, monkeypatch):
    support = [_record(f"s{i}", c, n) for i, (n, c) in enumerate(COLOURS.items())]
    query = [_record("q0", COLOURS["green"], "green"), _record("q1", COLOURS["black"], "black")]
    classes = ["green", "black", "red"]

    def scores(model, samples, **kwargs):
        out = []
        for s in samples:
            answer = s.segments[-1][0]
            # green: sum -3 over 3 tokens (mean -1) beats red's -2 over 1 (mean -2); black always loses
            out.append({"green": (-3.0, 3), "black": (-9.0, 1), "red": (-2.0, 1)}[answer.split("<")[0]])
        return out

    monkeypatch.setattr(fewshot_module, "answer_loglikelihoods", scores)
    cfg = FewShotConfig(task="classification", support="support", query="query", shots=[2], classes=classes)
    result = FewShotEvaluator(cfg).evaluate(model, _context(tmp_path, support, query))
    assert [it["prediction"] for it in result.items] == ["green", "green"]
    assert result.metrics["2 shots"] == 0.5


def test_class_folders_and_errors(tmp_path, model):
    for name in ("red_circle", "blue_square"):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "classes" / name / f"{i}.png")
    ds = ClassFolders(ClassFoldersConfig(root=str(tmp_path / "classes")))
    assert len(ds) == 6 and ds.classes == ["blue square", "red circle"]
    assert ds[0].query.turns[-1].text == "blue square" and ds[5].query.turns[-1].text == "red circle"
    with pytest.raises(VlmkitError, match="nope"):
        ClassFolders(ClassFoldersConfig(root=str(tmp_path / "classes"), classes=["nope"]))
    cfg = FewShotConfig(task="vqa", support="support", query="query", shots=[8])
    with pytest.raises(VlmkitError, match="needs 8 demonstrations"):
        FewShotEvaluator(cfg).evaluate(model, _context(tmp_path, ds, ds))
    text_only = Record(id="t", query=Exchange([Turn("user", "q"), Turn("assistant", "a")]))
    with pytest.raises(VlmkitError, match="no picture"):
        FewShotEvaluator(FewShotConfig(task="vqa", support="support", query="query", shots=[1])).evaluate(
            model, _context(tmp_path, [text_only] * 3, [text_only]))


def test_recipes_eval_runs_fewshot_on_a_trained_run(tmp_path, capsys):
    import json

    from vlmkit.core.cli import main
    from vlmkit.core.engine import run

    out = tmp_path / "run"
    run(load_recipe("otter_mimicit", "smoke"), out, progress=False)
    entries = [{"type": "fewshot", "task": "vqa", "support": "images", "query": "eval_images", "shots": [0, 2],
                "limit": 3, "max_new_tokens": 2},
               {"type": "fewshot", "task": "captioning", "support": "captions", "query": "captions", "shots": [2],
                "demos": "rices", "limit": 3, "max_new_tokens": 3, "num_beams": 1}]
    assert main(["eval", str(out), "--set", "eval=" + json.dumps(entries), "--label", "fs", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fewshot_vqa: VQA accuracy" in printed and "fewshot_captioning: CIDEr-D" in printed
    vqa = json.loads((out / "eval" / "fs" / "fewshot_vqa.json").read_text())
    assert vqa["counts"] == {"0 shots": 3, "2 shots": 3} and set(vqa["curves"]["VQA accuracy"]) == {"0", "2"}
    assert (out / "eval" / "fs" / "fewshot_captioning.png").is_file()


def test_recipes_data_concepts_writes_the_benchmark(tmp_path, capsys):
    from vlmkit.core.cli import main

    assert main(["data", "concepts", "--out", str(tmp_path / "c"), "--seed", "2"]) == 0
    assert "90 training classes" in capsys.readouterr().out
    assert (tmp_path / "c" / "heldout_pairs.json").is_file() and len(list((tmp_path / "c" / "train").iterdir())) == 90
