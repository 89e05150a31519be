"""The ``instructions`` evaluator: held-out instructions answered greedily, scored by exact match.

Each record of the named data entries is rendered by its chat template, cut before its final
answer (:func:`~vlmkit.core.evaluation.generation.split_prompt`) and answered greedily; an answer
is right when it equals the reference up to case, punctuation and spacing. Accuracy is reported
overall and per question type: the types come from ``question_types`` (a JSON file mapping record
id -> type, such as the demo data's ``DEMO_EVAL_types.json``), else each data entry is one type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt

from vlmkit.core.data.records import Record
from vlmkit.core.errors import VlmkitError
from vlmkit.core.evaluation.generation import generate, split_prompt
from vlmkit.core.evaluation.scoring import exact_match
from vlmkit.core.interfaces import EvalContext, EvalResult, Evaluator, EvaluatorConfig, Sample


class InstructionsConfig(EvaluatorConfig):
    data: list[str] = Field(min_length=1)
    """Entries of the recipe's ``data`` section to evaluate on (held-out splits)."""
    question_types: str | None = None
    """A JSON file mapping record id -> question type; none: each data entry is one type."""
    max_new_tokens: PositiveInt = 8
    """Tokens generated per answer at most."""
    batch_size: PositiveInt = 8
    """Prompts generated together."""
    limit: PositiveInt | None = None
    """Evaluate only the first this many records of each data entry."""
    show: int = Field(3, ge=0)
    """Sample questions to show with their answers."""


def read_question_types(path: str | None) -> dict[str, str] | None:
    """The ``question_types`` file of an eval entry (record id -> type), or None without one."""
    if path is None:
        return None
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmkitError(f"eval: question_types: '{file}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmkitError(f"eval: question_types: '{file}' is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise VlmkitError(f"eval: question_types: '{file}' must be a JSON object of record id -> type name (strings)")
    return data


@dataclass
class HeldOutQuestion:
    """One held-out record rendered for evaluation: ``sample`` (the whole rendered text with its
    answer, what a teacher-forced loss reads), ``prompt`` (cut before the final answer, what
    generation continues) and ``item`` (id, data, type, question, reference: the start of the
    record's entry in a result's items)."""

    sample: Sample
    prompt: Sample
    item: dict[str, Any]


def held_out_questions(
    context: EvalContext, alias: str, tokenizer: Any, *, types: dict[str, str] | None, types_file: str | None,
    limit: int | None, evaluator: str,
) -> list[HeldOutQuestion]:
    """The first ``limit`` (all: None) records of data entry ``alias`` rendered by its template, each
    with its question type (from ``types``, read from ``types_file``; none: the alias) and its
    reference answer (the record's last assistant turn, or a ready-made sample's final answer)."""
    dataset, template = context.datasets[alias], context.templates.get(alias)
    questions: list[HeldOutQuestion] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(n):
        record = dataset[index]
        if isinstance(record, Sample):
            sample, question, reference = record, None, None
        else:
            if template is None:
                raise VlmkitError(f"data.{alias}.template: the {evaluator} evaluator needs the chat template of '{alias}'")
            sample = template.render(record, tokenizer)
            question, reference = _question_and_answer(record)
        prompt, target = split_prompt(sample)
        if reference is None:
            reference = target
        if types is not None and sample.id not in types:
            raise VlmkitError(f"eval: question_types: '{types_file}' has no type for record '{sample.id}' of data.{alias}")
        item = {"id": sample.id, "data": alias, "type": types[sample.id] if types is not None else alias,
                "question": question, "reference": reference}
        questions.append(HeldOutQuestion(sample, prompt, item))
    return questions


class InstructionsEvaluator(Evaluator):
    """Held-out instruction following, greedy answers scored by exact match, per question type."""

    Config = InstructionsConfig

    def data_aliases(self) -> list[str]:
        return list(self.config.data)

    def evaluate(self, model: Any, context: EvalContext) -> EvalResult:
        cfg = self.config
        types = read_question_types(cfg.question_types)
        tokenizer = model.decoder.tokenizer
        items: list[dict[str, Any]] = []
        answers: list[str] = []
        for alias in cfg.data:
            questions = held_out_questions(context, alias, tokenizer, types=types, types_file=cfg.question_types,
                                           limit=cfg.limit, evaluator="instructions")
            items += [q.item for q in questions]
            answers += generate(model, [q.prompt for q in questions], context.templates.get(alias),
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                progress=context.progress, desc=f"{context.label}: {alias}")
        for item, answer in zip(items, answers):
            item["prediction"] = answer
            item["correct"] = exact_match(answer, item["reference"])
        metrics, counts = _accuracies(items)
        return EvalResult(name="instructions", metric="exact-answer accuracy", metrics=metrics, counts=counts,
                          items=items, examples=_examples(items, cfg.show))


def _question_and_answer(record: Record) -> tuple[str | None, str | None]:
    turns = record.query.turns
    answer = turns[-1].text if turns and turns[-1].role == "assistant" else None
    question = next((t.text for t in reversed(turns) if t.role == "user"), None)
    return question, answer


def _accuracies(items: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, int]]:
    by_type: dict[str, list[bool]] = {}
    for item in items:
        by_type.setdefault(item["type"], []).append(item["correct"])
    metrics = {"all": sum(i["correct"] for i in items) / len(items)} if items else {}
    counts = {"all": len(items)}
    for name, marks in by_type.items():
        metrics[name] = sum(marks) / len(marks)
        counts[name] = len(marks)
    return metrics, counts


def _examples(items: list[dict[str, Any]], show: int) -> list[str]:
    """The first item of each type in turn, up to ``show``."""
    chosen: list[str] = []
    seen: set[str] = set()
    for item in items:
        if len(chosen) == show:
            break
        if item["type"] not in seen:
            seen.add(item["type"])
            chosen.append(item["id"])
    return chosen
