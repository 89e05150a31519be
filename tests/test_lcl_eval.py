"""The link-context evaluations: string-match scoring on hand-written answers, likelihood choice,
and the three evaluators' accuracies for a model whose behaviour is known (it copies the first
support label), plus their JSON / markdown / PNG files."""

from __future__ import annotations

import json

import pytest

from vlmkit.core.compose import build_model
from vlmkit.lcl.episodes import LCLEpisodes, LCLEpisodesConfig, mentions, string_match
from vlmkit.lcl.synthetic_concepts import write_concepts
from vlmkit.lcl.template import LCLConfig, LCLTemplate
from vlmkit.core.errors import VlmkitError
from vlmkit.lcl import evaluators as lcl_module
from vlmkit.lcl.evaluators import (
    LCLFalseRatioConfig,
    LCLFalseRatioEvaluator,
    LCLPositionConfig,
    LCLPositionEvaluator,
    LCLShotsConfig,
    LCLShotsEvaluator,
)
from vlmkit.core.evaluation.runner import write_result
from vlmkit.core.interfaces import EvalContext
from vlmkit.core.recipe.loader import load_recipe


def test_string_match_on_hand_written_answers():
    assert string_match('there is "zorb" in the image.', "zorb", "red circle")
    assert string_match("Red Circle.", "red circle", "zorb")
    assert not string_match("zorb or red circle", "zorb", "red circle")  # both names: wrong
    assert not string_match("zorbs", "zorb", "red circle")  # whole words only
    assert not string_match("", "zorb", "red circle")
    assert not string_match("a red circle", "red circle with blue square", "red circle")
    assert mentions("it is a red circle with blue square", "red circle") and not mentions("redcircle", "red circle")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_concepts(tmp_path_factory.mktemp("concepts"), seed=1, train_composites=2, heldout_concepts=3,
                          train_images=3, heldout_images=10, image_size=32)
    ds = LCLEpisodes(LCLEpisodesConfig(root=str(root / "heldout"), pairs=str(root / "heldout_pairs.json"),
                                       strategy="2way", shots=8))
    template = LCLTemplate(LCLConfig(context_answer="{label}", final_answer="{label}"))
    model = build_model(load_recipe("lcl_repro", "smoke")).eval()
    return ds, template, model


def _context(setup, tmp_path):
    ds, template, _ = setup
    return EvalContext(datasets={"heldout": ds}, templates={"heldout": template}, output_dir=tmp_path, progress=False)


def _copy_first_label(model, prompts, template, **kwargs):
    """A 'model' that answers with the first support example's label."""
    out = []
    for prompt in prompts:
        text = "".join(t for t, _ in prompt.segments)
        first = text.split("ASSISTANT:", 1)[1].split("[END EXAMPLE]", 1)[0].strip()
        out.append(f'there is "{first}" in the image.')
    return out


def test_shots_accuracy_of_a_known_model(setup, tmp_path, monkeypatch):
    ds, _, model = setup
    monkeypatch.setattr(lcl_module, "generate", _copy_first_label)
    cfg = LCLShotsConfig(data="heldout", episodes=12, shots=[2, 6], likelihood=False)
    result = LCLShotsEvaluator(cfg).evaluate(model, _context(setup, tmp_path))
    for k in (2, 6):
        episodes = [ds.episode(i, shots=k, seed=cfg.seed) for i in range(12)]
        expect = sum(ep.support_labels[0] == ep.answer for ep in episodes) / 12
        assert result.metrics[f"{k} shots"] == pytest.approx(expect)
        assert result.curves["string match"][str(k)] == pytest.approx(expect)
    assert 0 < result.metrics["2 shots"] < 1  # both outcomes occur, so the check has teeth
    write_result(result, tmp_path / "after")
    data = json.loads((tmp_path / "after" / "lcl.json").read_text())
    assert data["curves"]["string match"]["2"] == result.metrics["2 shots"] and len(data["items"]) == 24
    assert (tmp_path / "after" / "lcl.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 6 shots |" in (tmp_path / "after" / "lcl.md").read_text()


def test_likelihood_picks_the_higher_mean_log_probability(setup, tmp_path, monkeypatch):
    _, _, model = setup
    monkeypatch.setattr(lcl_module, "generate", _copy_first_label)
    calls = []

    def scores(model, samples, **kwargs):  # true answer first: sum -4 over 4 tokens (mean -1) vs -3 over 1 (mean -3)
        calls.append(len(samples))
        return [(-4.0, 4) if i % 2 == 0 else (-3.0, 1) for i in range(len(samples))]

    monkeypatch.setattr(lcl_module, "answer_loglikelihoods", scores)
    cfg = LCLShotsConfig(data="heldout", episodes=5, shots=[4])
    result = LCLShotsEvaluator(cfg).evaluate(model, _context(setup, tmp_path))
    assert calls == [10] and result.metrics["4 shots, likelihood"] == 1.0

    monkeypatch.setattr(lcl_module, "answer_loglikelihoods", lambda m, s, **k: [(-1.0, 1) if i % 2 else (-2.0, 1) for i in range(len(s))])
    result = LCLShotsEvaluator(cfg).evaluate(model, _context(setup, tmp_path))
    assert result.metrics["4 shots, likelihood"] == 0.0


def test_likelihood_candidates_differ_only_in_the_final_answer(setup):
    ds, template, model = setup
    ep = ds.episode(0, shots=4)
    tok = model.decoder.tokenizer
    a = template.render(lcl_module._with_answer(ep, ep.answer), tok)
    b = template.render(lcl_module._with_answer(ep, ep.other), tok)
    assert a.segments[:-1] == b.segments[:-1]
    assert ep.answer in a.segments[-1][0] and ep.other in b.segments[-1][0] and a.segments[-1][1]


def test_false_ratio_and_position_of_a_known_model(setup, tmp_path, monkeypatch):
    _, _, model = setup
    monkeypatch.setattr(lcl_module, "generate", _copy_first_label)
    ratios = LCLFalseRatioEvaluator(LCLFalseRatioConfig(data="heldout", episodes=16, shots=4, ratios=[0, 1])).evaluate(
        model, _context(setup, tmp_path))
    # all labels false: the copied first label is right exactly when it was wrong before
    assert ratios.metrics["0% false"] + ratios.metrics["100% false"] == pytest.approx(1.0)
    assert ratios.curves["string match"] == {"0": ratios.metrics["0% false"], "100": ratios.metrics["100% false"]}
    position = LCLPositionEvaluator(LCLPositionConfig(data="heldout", episodes=16, shots=4)).evaluate(
        model, _context(setup, tmp_path))
    base = position.metrics["no change"]
    assert base == ratios.metrics["0% false"]
    assert position.metrics["position 1 changed"] == pytest.approx(1 - base)
    assert all(position.metrics[f"position {p} changed"] == base for p in (2, 3, 4))
    assert list(position.curves["string match"]) == ["1", "2", "3", "4"]


def test_lcl_evaluators_need_an_lcl_dataset(setup, tmp_path):
    _, template, model = setup
    context = EvalContext(datasets={"heldout": [1, 2]}, templates={"heldout": template}, output_dir=tmp_path, progress=False)
    with pytest.raises(VlmkitError, match="need an lcl dataset"):
        LCLShotsEvaluator(LCLShotsConfig(data="heldout")).evaluate(model, context)
    with pytest.raises(ValueError, match="even"):
        LCLShotsConfig(data="heldout", shots=[3])


def test_real_generation_through_the_tiny_model(setup, tmp_path):
    _, _, model = setup
    result = LCLPositionEvaluator(LCLPositionConfig(data="heldout", episodes=2, shots=2, max_new_tokens=3)).evaluate(
        model, _context(setup, tmp_path))
    assert set(result.metrics) == {"no change", "position 1 changed", "position 2 changed"}
    assert all(isinstance(it["prediction"], str) for it in result.items) and len(result.items) == 6
