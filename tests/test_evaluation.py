"""Evaluation: prompts cut before the answer, batched generation equal to one-by-one generation,
exact-match scoring, the instructions evaluator's per-type accuracy and files, and the
`recipes eval` / `recipes chat` commands on a trained smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.core.cli import main
from vlmkit.core.compose import build_model
from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.core.engine import run
from vlmkit.core.errors import VlmkitError
from vlmkit.evaluators import instructions as instructions_module
from vlmkit.core.evaluation.generation import generate, split_prompt
from vlmkit.core.evaluation.runner import run_evaluations
from vlmkit.core.evaluation.scoring import exact_match, normalize
from vlmkit.core.recipe.loader import load_recipe


@pytest.fixture(scope="module")
def otter_model():
    resolved = load_recipe("otter_mimicit", "smoke")
    return build_model(resolved).eval(), resolved


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    run(load_recipe("otter_mimicit", "smoke"), out, progress=False)
    return out


def _record(answer="red"):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (255, 0, 0))
    example = Exchange([Turn("user", "What colour?"), Turn("assistant", "blue")], [Media("e", [img])])
    query = Exchange([Turn("user", "What colour is the square?"), Turn("assistant", answer)], [Media("q", [img])])
    return Record(id="r1", query=query, context=[example])


def test_split_prompt_cuts_before_the_query_answer(otter_model):
    model, _ = otter_model
    template = model.templates["eval_images"]
    sample = template.render(_record(), model.decoder.tokenizer)
    prompt, target = split_prompt(sample)
    text = "".join(t for t, _ in prompt.segments)
    assert text.endswith("User: What colour is the square? GPT:<answer>")
    assert "blue<|endofchunk|>" in text  # the in-context example keeps its answer
    assert target.startswith(" red<|endofchunk|>")
    assert prompt.images == sample.images


def test_normalize_and_exact_match():
    assert normalize(" Red. ") == "red" and normalize("Two  circles!") == "two circles"
    assert exact_match("Left.", "left") and not exact_match("left side", "left") and not exact_match("", "left")


def test_batched_left_padded_generation_equals_one_by_one(otter_model):
    model, _ = otter_model
    template = model.templates["eval_images"]
    tok = model.decoder.tokenizer
    prompts = [split_prompt(template.render(_record(a), tok))[0] for a in ("red",)]
    short = Record(id="r2", query=Exchange([Turn("user", "Hi?"), Turn("assistant", "x")],
                                                                _record().query.media))
    prompts.append(split_prompt(template.render(short, tok))[0])
    torch.manual_seed(0)
    with torch.no_grad():  # open the gates so the images matter
        for block in model.fusion.blocks:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    together = generate(model, prompts, template, max_new_tokens=6, batch_size=2)
    alone = [generate(model, [p], template, max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone
    assert all(isinstance(a, str) for a in together)


def test_instructions_evaluator_scores_per_type_and_writes_results(otter_model, tmp_path, monkeypatch):
    model, resolved = otter_model
    data = resolved.recipe.eval[0].model_extra
    types = json.loads(open(data["question_types"]).read())

    def fake_generate(model, prompts, template, **kwargs):  # right answer for every other prompt
        out = []
        for i, p in enumerate(prompts):
            out.append(answers[p.id] if i % 2 == 0 else "wrong")
        return out

    from vlmkit.core.registry import get_registry

    registry = get_registry()
    answers = {}
    for alias in ("eval_images", "eval_video", "eval_in_context"):  # the last: the recipe's second entry
        spec = resolved.datasets[alias]
        ds = registry.component_class("dataset", spec.name)(spec.config)
        for i in range(min(3, len(ds))):
            answers[ds[i].id] = ds[i].query.turns[-1].text.upper() + "."  # case and punctuation do not matter
    monkeypatch.setattr(instructions_module, "generate", fake_generate)
    results = run_evaluations(model, resolved, tmp_path, "before", progress=False)
    result = results[0]
    items = result.items
    assert len(items) == 6 and result.counts["all"] == 6
    assert [i["correct"] for i in items] == [True, False, True, True, False, True]
    assert result.metrics["all"] == pytest.approx(4 / 6)
    for item in items:
        assert item["type"] == types[item["id"]]
    for name, value in result.metrics.items():
        if name != "all":
            marks = [i["correct"] for i in items if i["type"] == name]
            assert value == pytest.approx(sum(marks) / len(marks))
    saved = json.loads((tmp_path / "eval" / "before" / "instructions.json").read_text())
    assert saved["metrics"] == result.metrics and len(saved["items"]) == 6
    assert "| all | 0.667 |" in (tmp_path / "eval" / "before" / "instructions.md").read_text()
    assert len(result.examples) == 3 and len({next(i["type"] for i in items if i["id"] == e) for e in result.examples}) == 3


def test_question_types_file_must_cover_every_record(otter_model, tmp_path):
    model, resolved = otter_model
    bad = tmp_path / "types.json"
    bad.write_text(json.dumps({"nothing": "colour"}))
    from vlmkit.core.recipe.loader import load_recipe as load

    broken = load("otter_mimicit", "smoke", [f"eval.0.question_types={bad}"])
    with pytest.raises(VlmkitError, match="has no type for record"):
        run_evaluations(model, broken, tmp_path, "x", progress=False)


def test_eval_entries_are_validated_against_the_evaluator_and_the_data_section():
    from vlmkit.core.errors import RecipeError

    with pytest.raises(RecipeError, match=r"eval\.0\.data: no dataset 'nope'"):
        load_recipe("otter_mimicit", "smoke", ["eval.0.data=[nope]"])
    with pytest.raises(RecipeError, match=r"eval\.0\.type: unknown evaluator 'instruction'"):
        load_recipe("otter_mimicit", "smoke", ["eval.0.type=instruction"])
    with pytest.raises(RecipeError, match=r"eval\.0\.max_tokens"):
        load_recipe("otter_mimicit", "smoke", ["eval.0.max_tokens=3"])


def test_eval_entries_are_written_under_their_name(otter_model, tmp_path, monkeypatch):
    """Two entries of one evaluator: an entry's ``name`` names its results (files, tables), so they
    do not overwrite each other; entries without one keep the evaluator's name, numbered from the
    second on. ``name`` is the entry's, not an option of the evaluator."""
    from vlmkit.core.errors import RecipeError

    model, _ = otter_model
    monkeypatch.setattr(instructions_module, "generate", lambda model, prompts, template, **kw: ["x"] * len(prompts))
    entries = [{"type": "instructions", "data": ["eval_images"], "limit": 1},
               {"type": "instructions", "name": "held_out_icl", "data": ["eval_images"], "limit": 2},
               {"type": "instructions", "data": ["eval_video"], "limit": 1}]
    resolved = load_recipe("otter_mimicit", "smoke", ["eval=" + json.dumps(entries)])
    assert "name" not in resolved.evaluators[1].config.model_dump()
    results = run_evaluations(model, resolved, tmp_path, "after", progress=False)
    assert [r.name for r in results] == ["instructions", "held_out_icl", "instructions-2"]
    folder = tmp_path / "eval" / "after"
    assert sorted(p.name for p in folder.glob("*.json")) == ["held_out_icl.json", "instructions-2.json", "instructions.json"]
    saved = json.loads((folder / "held_out_icl.json").read_text())
    assert saved["name"] == "held_out_icl" and len(saved["items"]) == 2
    assert (folder / "held_out_icl.md").read_text().startswith("| held_out_icl: exact-answer accuracy |")
    assert len(json.loads((folder / "instructions.json").read_text())["items"]) == 1
    twice = [{**entries[0], "name": "a"}, {**entries[1], "name": "a"}]
    with pytest.raises(RecipeError, match=r"eval\.1\.name: eval entry name 'a' is used twice \(also eval\.0\)"):
        load_recipe("otter_mimicit", "smoke", ["eval=" + json.dumps(twice)])
    with pytest.raises(RecipeError, match=r"eval\.0\.name"):  # a file name: no folders, no spaces
        load_recipe("otter_mimicit", "smoke", ["eval=" + json.dumps([{**entries[0], "name": "../x"}])])


def test_in_context_prompts_hold_the_examples_with_their_answers(otter_model):
    """The held-out in-context entry: each prompt is the three training examples with their images
    and answers, then the held-out query cut before its answer, the only text left to generate."""
    from vlmkit.core.interfaces import EvalContext
    from vlmkit.core.registry import get_registry
    from vlmkit.evaluators.instructions import held_out_questions

    model, resolved = otter_model
    spec = resolved.datasets["eval_in_context"]
    ds = get_registry().component_class("dataset", spec.name)(spec.config)
    context = EvalContext(datasets={"eval_in_context": ds}, templates=dict(model.templates), output_dir=None, progress=False)
    questions = held_out_questions(context, "eval_in_context", model.decoder.tokenizer, types=None, types_file=None,
                                   limit=4, evaluator="instructions")
    assert len(questions) == 4
    for i, q in enumerate(questions):
        record = ds[i]
        text = "".join(t for t, _ in q.prompt.segments)
        assert len(record.context) == 3 and text.count("<image>") == 4 and len(q.prompt.images) == 4
        for example in record.context:
            question, answer = example.turns[0].text, example.turns[1].text
            assert f"<image>User: {question} GPT:<answer> {answer}<|endofchunk|>" in text
        assert text.endswith(f"<image>User: {record.query.turns[0].text} GPT:<answer>")
        assert q.item["id"] == record.id and q.item["question"] == record.query.turns[0].text
        assert q.item["reference"] == record.query.turns[1].text


def test_the_smoke_run_reports_held_out_accuracy_with_and_without_in_context_examples(smoke_run):
    """otter_mimicit's eval list: the held-out questions without in-context examples (instructions)
    and the same stills with them (instructions_in_context), before and after training."""
    for label in ("before", "after"):
        folder = smoke_run / "eval" / label
        plain = json.loads((folder / "instructions.json").read_text())
        icl = json.loads((folder / "instructions_in_context.json").read_text())
        assert icl["name"] == "instructions_in_context" and icl["counts"]["all"] == 3
        assert [i["id"] for i in icl["items"]] == [f"DEMO_ICL_EVAL_INS_0000{n}" for n in (1, 2, 3)]
        stills = [i for i in plain["items"] if i["data"] == "eval_images"]
        assert [(i["question"], i["reference"], i["type"]) for i in icl["items"]] == \
            [(i["question"], i["reference"], i["type"]) for i in stills]
        assert (folder / "instructions_in_context.md").read_text().startswith(
            "| instructions_in_context: exact-answer accuracy |")


def test_the_run_report_pairs_before_and_after_by_name(tmp_path, monkeypatch):
    """Results read back from eval/before/ (a resumed run) come in file-name order, not the eval
    list's: each plot still shows one evaluator before and after."""
    from vlmkit.core import cli
    from vlmkit.core.evaluation import runner
    from vlmkit.core.interfaces import EvalResult

    def result(name, value):
        return EvalResult(name=name, metric="accuracy", metrics={"all": value}, counts={"all": 1})

    drawn = []
    monkeypatch.setattr(runner, "comparison_plot", lambda results, labels, path: drawn.append(
        (path.name, [r.name for r in results], labels)))
    after = [result("instructions", 0.5), result("instructions_in_context", 0.6), result("image_use", 0.4)]
    before = sorted([result("instructions", 0.0), result("instructions_in_context", 0.0)], key=lambda r: r.name)
    cli._evaluation_report({"before": before, "after": after}, tmp_path)
    assert drawn == [("instructions.png", ["instructions", "instructions"], ["before", "after"]),
                     ("instructions_in_context.png", ["instructions_in_context"] * 2, ["before", "after"]),
                     ("image_use.png", ["image_use"], ["after"])]
    assert "| instructions_in_context: accuracy | before | after | n |" in (tmp_path / "eval" / "summary.md").read_text()


def test_recipes_eval_on_a_run_folder(smoke_run, capsys):
    assert main(["eval", str(smoke_run), "--data", "eval_images", "--label", "again", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| instructions: exact-answer accuracy | again | n |" in out
    saved = json.loads((smoke_run / "eval" / "again" / "instructions.json").read_text())
    assert {i["data"] for i in saved["items"]} == {"eval_images"}
    assert main(["eval", str(smoke_run), "--set", "model.connector.depth=3"]) == 2
    assert "only the recipe's data and eval sections" in capsys.readouterr().err


def test_recipes_chat_answers_with_in_context_examples(smoke_run, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (0, 0, 255)).save(image)
    code = main(["chat", str(smoke_run), "--image", str(image), "--example", str(image), "What colour?", "blue",
                 "--question", "What colour is it?", "--question", "And the shape?", "--max-new-tokens", "3"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> What colour is it?" and lines[2] == "> And the shape?" and len(lines) == 4
    assert main(["chat", str(smoke_run), "--image", str(tmp_path / "missing.png"), "--question", "x"]) == 2
    assert "--image: '" in capsys.readouterr().err
