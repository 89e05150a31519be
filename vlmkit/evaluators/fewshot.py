"""The ``fewshot`` evaluator: OpenFlamingo's few-shot protocol (REFERENCE 1.7).

Demonstrations come from a ``support`` data entry (the train split) and queries from a ``query``
entry (held out); both are datasets of records with one picture and a question/answer exchange
(``captions``, ``mimicit``, ``llava``, ``class_folders``, ``toy_captions``). A record's query may
carry several references (``Exchange.references``: a ``captions`` entry's ``captions: [...]``, a
``llava`` entry's ``answers: [...]``); without them its answer is the only reference. Prompts are
OpenFlamingo's, not the data's template:

- captioning: ``<image>Output:{caption}<|endofchunk|>`` and a newline per demonstration (the
  demonstration's caption, stripped), then ``<image>Output:``; beams 3, at most 20 new tokens; the
  output is cut at the first ``Output`` and loses its double quotes; scored by CIDEr-D against
  every reference caption of the query's picture;
- vqa: ``<image>Question:{q} Short answer:{a}<|endofchunk|>`` and a newline per demonstration (its
  answer: the record's answer, as OpenFlamingo shows the first human answer), then
  ``<image>Question:{q} Short answer:``; beams 3, at most 5 new tokens; the output is cut at the
  first ``Question``, ``Answer`` or ``Short`` and then at the first ``", "``; scored by VQA
  accuracy against every reference answer (the benchmark's normalisation, 10-choose-9 averaging);
- classification: ``<image>Output:{class}<|endofchunk|>`` per demonstration (no newline); every
  class name is scored by its length-normalised log-likelihood and the best one is the answer
  (top-1 accuracy).

Beam search scores beams by their summed log-probability (``length_penalty`` 0, OpenFlamingo's
evaluation default).

Demonstrations are drawn at random from a fixed pool (the first ``pool`` support records after a
seeded shuffle) or by RICES: the pool records whose pictures' encoder features are most similar to
the query's (cosine of mean-pooled features), most similar last. "0 shots" shows two text-only
demonstrations (no pictures), as OpenFlamingo does. ``<|endofchunk|>`` is the end marker when the
tokenizer has it (Otter / OpenFlamingo models), else the tokenizer's EOS text.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, field_validator

from vlmkit.core.data.collate import image_to_tensor
from vlmkit.core.data.records import Record
from vlmkit.core.errors import VlmkitError
from vlmkit.core.evaluation.generation import generate
from vlmkit.core.evaluation.likelihood import answer_loglikelihoods, normalised
from vlmkit.core.evaluation.scoring import (
    caption_tokens,
    cider_d,
    normalize,
    postprocess_caption,
    postprocess_vqa,
    vqa_accuracy,
)
from vlmkit.core.interfaces import END_OF_CHUNK, IMAGE_TOKEN, EvalContext, EvalResult, Evaluator, EvaluatorConfig, Sample


class FewShotConfig(EvaluatorConfig):
    task: Literal["captioning", "vqa", "classification"]
    support: str
    """The data entry demonstrations come from (a train split)."""
    query: str
    """The data entry evaluated (a held-out split)."""
    shots: list[int] = [0, 4, 8]
    """Demonstrations per prompt; 0 means two text-only demonstrations."""
    demos: Literal["random", "rices"] = "random"
    pool: PositiveInt = 2048
    """Support records demonstrations are drawn from."""
    limit: PositiveInt | None = None
    """Evaluate only the first this many query records."""
    classes: list[str] | None = None
    """classification: the class names (default: every answer of the support pool and queries)."""
    max_new_tokens: PositiveInt | None = None
    """Default: 20 for captioning, 5 for vqa."""
    num_beams: PositiveInt = 3
    """Beams of the beam search (captioning and vqa; OpenFlamingo: 3)."""
    length_penalty: float = 0.0
    """Beam scores are summed log-probabilities divided by length ** this (OpenFlamingo: 0)."""
    batch_size: PositiveInt = 8
    seed: int = 0
    show: int = Field(3, ge=0)

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value or any(v < 0 for v in value):
            raise ValueError("shots: non-negative counts, at least one")
        return value


def picture_qa(record: Any, alias: str) -> tuple[Any, str, str, list[str]]:
    """(first picture, question, answer, references) of a record's query exchange; the references
    are the exchange's ``references`` or, without them, ``[answer]``."""
    if not isinstance(record, Record):
        raise VlmkitError(f"eval: data '{alias}' yields {type(record).__name__}; fewshot needs records with pictures")
    query = record.query
    if not query.media:
        raise VlmkitError(f"eval: record '{record.id}' of data '{alias}' has no picture; fewshot evaluates pictures")
    answer = next((t.text for t in reversed(query.turns) if t.role == "assistant"), None)
    question = next((t.text for t in reversed(query.turns) if t.role == "user"), "")
    if answer is None:
        raise VlmkitError(f"eval: record '{record.id}' of data '{alias}' has no answer")
    return query.media[0].frames[0], question, answer, query.reference_answers()


class FewShotEvaluator(Evaluator):
    """OpenFlamingo-style few-shot captioning (CIDEr), VQA (accuracy) or classification (log-likelihood)."""

    Config = FewShotConfig

    def data_aliases(self) -> list[str]:
        return list(dict.fromkeys([self.config.support, self.config.query]))

    # ------------------------------------------------------------------------------ prompts
    def _text(self, question: str, answer: str | None, end: str) -> str:
        task = self.config.task
        body = f"Question:{question} Short answer:" if task == "vqa" else "Output:"
        if answer is None:
            return body
        if task == "captioning":
            answer = answer.strip()
        # OpenFlamingo ends every captioning / VQA demonstration with a newline, not classification's
        return f"{body}{answer}{end}" + ("" if task == "classification" else "\n")

    def _prompt(self, demos: list[tuple], query: tuple, shots: int, end: str, answer: str | None = None) -> Sample:
        segments: list[tuple[str, bool]] = []
        images: list[Any] = []
        for image, question, ans, *_ in demos:
            if shots > 0:
                images.append(image)
                segments.append((IMAGE_TOKEN + self._text(question, ans, end), False))
            else:  # 0-shot: text-only demonstrations
                segments.append((self._text(question, ans, end), False))
        images.append(query[0])
        segments.append((IMAGE_TOKEN + self._text(query[1], None, end), False))
        if answer is not None:
            segments.append((answer + end, True))
        return Sample(id="", images=images, segments=segments)

    def _features(self, model: Any, pictures: list[Any]) -> torch.Tensor:
        pre = model.encoder.preprocess
        device = next(model.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, len(pictures), 32):
                pix = torch.stack([image_to_tensor(p, pre) for p in pictures[start:start + 32]]).to(device)
                out.append(torch.nn.functional.normalize(model.encoder(pix).float().mean(1), dim=-1).cpu())
        return torch.cat(out)

    # ---------------------------------------------------------------------------- evaluate
    def evaluate(self, model: Any, context: EvalContext) -> EvalResult:
        cfg = self.config
        tokenizer = model.decoder.tokenizer
        has_eoc = END_OF_CHUNK in tokenizer.get_vocab()
        end = END_OF_CHUNK if has_eoc else (tokenizer.eos_token or "")

        class _Stops:
            stop_tokens = (END_OF_CHUNK,) if has_eoc else ()

        support_ds, query_ds = context.datasets[cfg.support], context.datasets[cfg.query]
        order = list(range(len(support_ds)))
        random.Random(f"fewshot-pool:{cfg.seed}").shuffle(order)
        pool = [picture_qa(support_ds[i], cfg.support) for i in order[: cfg.pool]]
        n_query = len(query_ds) if cfg.limit is None else min(cfg.limit, len(query_ds))
        queries = [(query_ds[i].id, picture_qa(query_ds[i], cfg.query)) for i in range(n_query)]
        need = max(max(cfg.shots), 2)
        if len(pool) < need:
            raise VlmkitError(f"eval: fewshot needs {need} demonstrations but data '{cfg.support}' has {len(pool)} records")
        similar = None
        if cfg.demos == "rices":
            pool_f = self._features(model, [p[0] for p in pool])
            query_f = self._features(model, [q[1][0] for q in queries])
            similar = (query_f @ pool_f.T).argsort(dim=-1, descending=True)
        classes = cfg.classes or list(dict.fromkeys([p[2] for p in pool] + [q[1][2] for q in queries]))

        items: list[dict] = []
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        metric = {"captioning": "CIDEr-D", "vqa": "VQA accuracy", "classification": "top-1 accuracy"}[cfg.task]
        for shots in cfg.shots:
            k = shots if shots > 0 else 2
            prompts, demo_sets = [], []
            for qi, (qid, query) in enumerate(queries):
                if similar is not None and shots > 0:
                    demos = [pool[int(j)] for j in similar[qi, :k].flip(0)]  # most similar last
                else:
                    rng = random.Random(f"fewshot:{cfg.seed}:{shots}:{qi}")
                    demos = [pool[j] for j in rng.sample(range(len(pool)), k)]
                demo_sets.append(demos)
                prompts.append(self._prompt(demos, query, shots, end))
            row = f"{shots} shots"
            if cfg.task == "classification":
                predictions = self._classify(model, demo_sets, queries, shots, end, classes, context, row)
            else:
                new = cfg.max_new_tokens or (20 if cfg.task == "captioning" else 5)
                outputs = generate(model, prompts, _Stops, max_new_tokens=new, batch_size=cfg.batch_size,
                                   num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                                   progress=context.progress, desc=f"{context.label}: fewshot {row}")
                cut = postprocess_caption if cfg.task == "captioning" else postprocess_vqa
                predictions = [cut(o) for o in outputs]
            scores = self._score(predictions, [q[1] for q in queries])
            for (qid, query), pred, score in zip(queries, predictions, scores):
                items.append({"id": f"{row}/{qid}", "shots": shots, "question": query[1] or qid, "reference": query[2],
                              "references": query[3], "prediction": pred, "score": score,
                              "correct": score > 0.5 if cfg.task != "captioning" else score > 1.0})
            metrics[row] = sum(scores) / len(scores) if scores else 0.0
            counts[row] = len(scores)
        curves = {metric: {str(s): metrics[f"{s} shots"] for s in cfg.shots}}
        examples = [it["id"] for it in items if it["shots"] == cfg.shots[-1]][: cfg.show]
        return EvalResult(name=f"fewshot_{cfg.task}", metric=metric, metrics=metrics, counts=counts, items=items,
                          examples=examples, curves=curves, x_label="shots (0 = two text-only demonstrations)")

    def _classify(self, model: Any, demo_sets: list, queries: list, shots: int, end: str, classes: list[str],
                  context: EvalContext, row: str) -> list[str]:
        samples = [self._prompt(demos, query, shots, end, answer=name)
                   for demos, (_, query) in zip(demo_sets, queries) for name in classes]
        scores = answer_loglikelihoods(model, samples, batch_size=self.config.batch_size, progress=context.progress,
                                       desc=f"{context.label}: fewshot {row}")
        out = []
        for qi in range(len(queries)):
            row_scores = [normalised(s) for s in scores[qi * len(classes):(qi + 1) * len(classes)]]
            out.append(classes[max(range(len(classes)), key=row_scores.__getitem__)])
        return out

    def _score(self, predictions: list[str], queries: list[tuple]) -> list[float]:
        """Per query: CIDEr-D against all its reference captions (document frequencies over the
        references of every query), VQA accuracy against all its answers, or whether the class
        is its answer."""
        task = self.config.task
        references = [q[3] for q in queries]
        if task == "captioning":
            if not queries:
                return []
            keys = [str(i) for i in range(len(queries))]
            _, per = cider_d({k: caption_tokens(p) for k, p in zip(keys, predictions)},
                             {k: [caption_tokens(r) for r in refs] for k, refs in zip(keys, references)})
            return [per[k] for k in keys]
        if task == "vqa":
            return [vqa_accuracy(p, refs) for p, refs in zip(predictions, references)]
        return [float(normalize(p) == normalize(q[2])) for p, q in zip(predictions, queries)]
