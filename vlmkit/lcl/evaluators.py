"""The link-context learning evaluations (REFERENCE 1.5), on an ``lcl`` dataset's episodes.

- ``lcl``: accuracy by shot count (2..16 support pictures, both classes together), scored two ways:
  the reference's string match on the greedy answer (right when the true name is mentioned and the
  other class's name is not), and likelihood (the model prefers the true name's final answer to the
  other name's, by mean log-probability per token).
- ``lcl_false_ratio``: string-match accuracy as 0, 25, 50, 75 and 100% of the support labels show the
  other class's name. A model that uses the link follows the labels and falls to 0 at 100%.
- ``lcl_position``: string-match accuracy when the label at one support position is changed, for
  each position (which examples the model relies on).

Every setting evaluates the same ``episodes`` episodes (the same class pairs, drawn from the
evaluator's ``seed``), so settings differ only in what they change.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, ClassVar

from pydantic import Field, PositiveInt, field_validator

from vlmkit.lcl.episodes import Episode, LCLEpisodes, string_match
from vlmkit.core.data.records import Exchange, Turn
from vlmkit.core.errors import VlmkitError
from vlmkit.core.evaluation.generation import generate, split_prompt
from vlmkit.core.evaluation.likelihood import answer_loglikelihoods, normalised
from vlmkit.core.interfaces import EvalContext, EvalResult, Evaluator, EvaluatorConfig, Sample


class LCLEvalConfig(EvaluatorConfig):
    data: str
    """The recipe ``data`` entry of type ``lcl`` to draw episodes from (held-out concepts)."""
    episodes: PositiveInt = 40
    """Episodes per setting."""
    seed: int = 1234
    """Seed of the evaluated episodes (independent of the dataset's training seed)."""
    max_new_tokens: PositiveInt = 16
    batch_size: PositiveInt = 8
    show: int = Field(3, ge=0)
    """Episodes to show with their answers."""


def _even(value: int) -> int:
    if value < 2 or value % 2:
        raise ValueError(f"{value}: shot counts are even and at least 2 (k/2 pictures per class)")
    return value


class LCLShotsConfig(LCLEvalConfig):
    shots: list[int] = [2, 4, 6, 8, 10, 12, 14, 16]
    """Support sizes to evaluate (even: both classes together)."""
    likelihood: bool = True
    """Also score by likelihood of the true name's answer against the other name's."""

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one shot count")
        return [_even(v) for v in value]


class LCLFalseRatioConfig(LCLEvalConfig):
    shots: int = 8
    ratios: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Fractions of support labels swapped to the other class's name."""

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: int) -> int:
        return _even(value)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 <= r <= 1 for r in value):
            raise ValueError("ratios are fractions between 0 and 1 (at least one)")
        return value


class LCLPositionConfig(LCLEvalConfig):
    shots: int = 8

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: int) -> int:
        return _even(value)


class _LCLBase(Evaluator):
    Config: ClassVar[type[EvaluatorConfig]] = LCLEvalConfig

    def data_aliases(self) -> list[str]:
        return [self.config.data]

    def _dataset(self, context: EvalContext) -> tuple[LCLEpisodes, Any]:
        alias = self.config.data
        dataset = context.datasets[alias]
        if not isinstance(dataset, LCLEpisodes):
            raise VlmkitError(f"eval: data '{alias}' is a {type(dataset).__name__} dataset; the lcl evaluations need "
                              f"an lcl dataset (type: lcl)")
        template = context.templates.get(alias)
        if template is None:
            raise VlmkitError(f"data.{alias}.template: the lcl evaluations need a chat template (e.g. lcl)")
        return dataset, template

    def _answers(self, model: Any, episodes: list[Episode], template: Any, context: EvalContext, desc: str) -> list[str]:
        tokenizer = model.decoder.tokenizer
        prompts = [split_prompt(template.render(ep.record, tokenizer))[0] for ep in episodes]
        return generate(model, prompts, template, max_new_tokens=self.config.max_new_tokens,
                        batch_size=self.config.batch_size, progress=context.progress, desc=desc)

    def _run(self, model: Any, context: EvalContext, settings: list[tuple[str, Any]],
             name: str) -> tuple[list[dict], dict[str, float], dict[str, int], dict[str, list[Episode]]]:
        """Generate and string-match every (setting, episode); ``settings``: (row, episode kwargs).
        Also returns each row's episodes."""
        dataset, template = self._dataset(context)
        items: list[dict] = []
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        drawn: dict[str, list[Episode]] = {}
        for row, kwargs in settings:
            episodes = [dataset.episode(i, seed=self.config.seed, **kwargs(i) if callable(kwargs) else kwargs)
                        for i in range(self.config.episodes)]
            drawn[row] = episodes
            answers = self._answers(model, episodes, template, context, f"{context.label}: {name} {row}")
            marks = []
            for i, (ep, answer) in enumerate(zip(episodes, answers)):
                ok = string_match(answer, ep.answer, ep.other)
                marks.append(ok)
                items.append({"id": f"{row}/{i}", "setting": row, "episode": i, "question": f"{row}: {' | '.join(ep.support_labels)}",
                              "reference": ep.answer, "other": ep.other, "prediction": answer, "correct": ok})
            metrics[row] = sum(marks) / len(marks)
            counts[row] = len(marks)
        return items, metrics, counts, drawn


def _curve(metrics: dict[str, float], rows: list[str], xs: list[int]) -> dict[str, float]:
    return {str(x): metrics[r] for r, x in zip(rows, xs)}


def _with_answer(episode: Episode, name: str) -> Any:
    query = episode.record.query
    turns = [Turn(t.role, t.text) for t in query.turns[:-1]] + [Turn("assistant", name)]
    return replace(episode.record, query=Exchange(turns, media=query.media, id=query.id))


class LCLShotsEvaluator(_LCLBase):
    """Link-context accuracy by shots, string match and likelihood."""

    Config = LCLShotsConfig

    def evaluate(self, model: Any, context: EvalContext) -> EvalResult:
        cfg = self.config
        rows = [f"{k} shots" for k in cfg.shots]
        items, metrics, counts, drawn = self._run(model, context, [(r, {"shots": k}) for r, k in zip(rows, cfg.shots)],
                                                  "lcl")
        curves = {"string match": _curve(metrics, rows, cfg.shots)}
        if cfg.likelihood:
            template = self._dataset(context)[1]
            tokenizer = model.decoder.tokenizer
            by_id = {it["id"]: it for it in items}
            for row in rows:
                episodes = drawn[row]
                samples: list[Sample] = []
                for ep in episodes:
                    samples += [template.render(_with_answer(ep, ep.answer), tokenizer),
                                template.render(_with_answer(ep, ep.other), tokenizer)]
                scores = answer_loglikelihoods(model, samples, batch_size=cfg.batch_size, progress=context.progress,
                                               desc=f"{context.label}: lcl {row} likelihood")
                marks = [normalised(scores[2 * i]) > normalised(scores[2 * i + 1]) for i in range(len(episodes))]
                for i, ok in enumerate(marks):
                    by_id[f"{row}/{i}"]["correct_likelihood"] = ok
                metrics[f"{row}, likelihood"] = sum(marks) / len(marks)
                counts[f"{row}, likelihood"] = len(marks)
            curves["likelihood"] = {str(k): metrics[f"{r}, likelihood"] for r, k in zip(rows, cfg.shots)}
        return EvalResult(name="lcl", metric="accuracy", metrics=metrics, counts=counts, items=items,
                          examples=_examples(items, cfg.show), curves=curves, x_label="shots (both classes)")


class LCLFalseRatioEvaluator(_LCLBase):
    """Link-context accuracy as a growing share of support labels is false."""

    Config = LCLFalseRatioConfig

    def evaluate(self, model: Any, context: EvalContext) -> EvalResult:
        cfg = self.config
        rows = [f"{round(100 * r)}% false" for r in cfg.ratios]

        def swapped(ratio: float):
            def kwargs(i: int) -> dict:
                rng = random.Random(f"false:{cfg.seed}:{i}:{ratio}")
                return {"shots": cfg.shots, "swapped": frozenset(rng.sample(range(cfg.shots), round(ratio * cfg.shots)))}
            return kwargs

        items, metrics, counts, _ = self._run(model, context, [(r, swapped(x)) for r, x in zip(rows, cfg.ratios)],
                                           "lcl_false_ratio")
        curves = {"string match": {str(round(100 * x)): metrics[r] for r, x in zip(rows, cfg.ratios)}}
        return EvalResult(name="lcl_false_ratio", metric=f"accuracy at {cfg.shots} shots", metrics=metrics, counts=counts,
                          items=items, examples=_examples(items, cfg.show), curves=curves,
                          x_label="support labels that are false (%)")


class LCLPositionEvaluator(_LCLBase):
    """Link-context accuracy when the label at one support position is changed."""

    Config = LCLPositionConfig

    def evaluate(self, model: Any, context: EvalContext) -> EvalResult:
        cfg = self.config
        positions = list(range(cfg.shots))
        rows = ["no change"] + [f"position {p + 1} changed" for p in positions]
        settings = [("no change", {"shots": cfg.shots})] + [
            (f"position {p + 1} changed", {"shots": cfg.shots, "swapped": frozenset({p})}) for p in positions]
        items, metrics, counts, _ = self._run(model, context, settings, "lcl_position")
        curves = {"string match": {str(p + 1): metrics[f"position {p + 1} changed"] for p in positions},
                  "no change": {str(p + 1): metrics["no change"] for p in positions}}
        return EvalResult(name="lcl_position", metric=f"accuracy at {cfg.shots} shots", metrics=metrics, counts=counts,
                          items=items, examples=_examples(items, cfg.show), curves=curves,
                          x_label="support position whose label is changed (1 = first)")


def _examples(items: list[dict], show: int) -> list[str]:
    """The first episode of evenly spread settings, up to ``show``."""
    settings = list(dict.fromkeys(it["setting"] for it in items))
    if not show or not settings:
        return []
    step = max(1, len(settings) // show)
    chosen = settings[::step][:show]
    return [f"{s}/0" for s in chosen]
