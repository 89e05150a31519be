"""The ``image_use`` evaluator: does the model look at its images? ("is my VLM blind?")

The held-out questions of the named data entries (rendered and typed as the ``instructions``
evaluator does, :func:`~vlmkit.evaluators.instructions.held_out_questions`) are evaluated
three times, under three conditions of their images:

- ``right``: the images as given;
- ``shuffled``: every sample gets the images of another sample, by a seeded derangement
  (:func:`shuffled_sources`) among the samples of the same media layout (as many images, each
  with as many frames: still pictures among still pictures, clips among clips) that never gives a
  sample images equal to its own (held-out data often asks several questions about one picture);
- ``blank``: every image (every frame) replaced by a uniform image of the data entry's mean
  colour, of the same size and frame count.

Per condition and question type it measures the answer loss (the mean negative log-probability
per trained token, teacher-forced, over the trained tokens only as the training loss: pooled over
the type's tokens) and the greedy exact-answer accuracy (the same generation and answer matching
as ``instructions``). A model that ignores its images scores the same under all three; one that
uses them has a **gap**: ``loss gap = shuffled loss - right loss`` and ``acc gap = right accuracy
- shuffled accuracy``, both positive. The result's rows are the three conditions' loss and
accuracy over all questions, the two gaps over all questions and the two gaps per question type;
its curves (the PNG) are the loss and accuracy over all questions against the condition.

A sample without images, or one for which no sample of its layout holds different images, has no
shuffled condition: it is left out of every condition and listed in the items with the reason.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field, PositiveInt

from vlmkit.core.errors import VlmkitError
from vlmkit.core.evaluation.generation import generate, split_prompt
from vlmkit.evaluators.instructions import HeldOutQuestion, held_out_questions, read_question_types
from vlmkit.core.evaluation.likelihood import answer_loglikelihoods
from vlmkit.core.evaluation.scoring import exact_match
from vlmkit.core.interfaces import EvalContext, EvalResult, Evaluator, EvaluatorConfig, Sample

#: the conditions of the images, in the order they are evaluated and drawn
CONDITIONS = ("right", "shuffled", "blank")


class ImageUseConfig(EvaluatorConfig):
    data: list[str] = Field(min_length=1)
    """Entries of the recipe's ``data`` section to evaluate on (held-out splits)."""
    question_types: str | None = None
    """A JSON file mapping record id -> question type; none: each data entry is one type."""
    max_new_tokens: PositiveInt = 8
    """Tokens generated per answer at most."""
    batch_size: PositiveInt = 8
    """Samples generated or scored together."""
    limit: PositiveInt | None = None
    """Evaluate only the first this many records of each data entry."""
    seed: int = 0
    """Seed of the shuffled condition's derangement."""


# ----------------------------------------------------------------------------------------- media
def _frames(image: Any) -> list[Any]:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def media_layout(images: Sequence[Any]) -> tuple[int, ...]:
    """A sample's media layout: the frame count of each of its images (``(1,)``: one picture,
    ``(4,)``: one clip of 4 frames, ``(1, 1)``: two pictures). Samples of one layout can trade
    images; pixel sizes do not matter (the collator resizes every frame to the encoder's size)."""
    return tuple(len(_frames(image)) for image in images)


def media_fingerprint(images: Sequence[Any]) -> str:
    """A digest of a sample's pixels (every frame's mode, size and bytes, in order): equal for
    samples that show the same images."""
    digest = hashlib.blake2b(digest_size=16)
    for image in images:
        digest.update(b"<media>")
        for frame in _frames(image):
            digest.update(f"{frame.mode}:{frame.size}".encode())
            digest.update(frame.tobytes())
    return digest.hexdigest()


def shuffled_sources(layouts: Sequence[Hashable], contents: Sequence[Hashable], seed: int | str) -> list[int | None]:
    """For each sample, the index of the sample whose images it gets in the shuffled condition,
    or None when no sample of its layout has different images.

    Within each group of equal ``layouts``, the samples are ordered in blocks of equal
    ``contents`` (blocks and the samples inside them in a random order drawn from ``seed`` and the
    layout), and sample ``k`` of that order takes the images of sample ``k + m`` (cyclically),
    ``m`` being the largest block's size. That is a permutation of the group without fixed points
    (a derangement), and as long as no block holds more than half the group it never hands a
    sample images equal to its own; the samples it still would (those of a block larger than half)
    get None. The same inputs and seed always give the same answer."""
    if len(layouts) != len(contents):
        raise ValueError("shuffled_sources: one layout and one content per sample")
    groups: dict[Hashable, list[int]] = {}
    for index, layout in enumerate(layouts):
        groups.setdefault(layout, []).append(index)
    sources: list[int | None] = [None] * len(layouts)
    for layout, members in groups.items():
        rng = random.Random(f"{seed}/{layout!r}")
        blocks: dict[Hashable, list[int]] = {}
        for index in members:
            blocks.setdefault(contents[index], []).append(index)
        ordered = list(blocks.values())
        rng.shuffle(ordered)
        for block in ordered:
            rng.shuffle(block)
        order = [index for block in ordered for index in block]
        shift = max(len(block) for block in ordered)
        for k, index in enumerate(order):
            source = order[(k + shift) % len(order)]
            if contents[source] != contents[index]:
                sources[index] = source
    return sources


def mean_colour(samples: Sequence[Sample]) -> tuple[int, int, int]:
    """The mean RGB colour of every frame of ``samples``' images (each frame weighs the same)."""
    means = [np.asarray(frame.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
             for sample in samples for image in sample.images for frame in _frames(image)]
    if not means:
        raise ValueError("mean_colour: the samples hold no images")
    return tuple(int(round(float(c))) for c in np.mean(means, axis=0))  # type: ignore[return-value]


def blank_images(images: Sequence[Any], colour: tuple[int, int, int]) -> list[Any]:
    """``images`` with every frame replaced by a uniform ``colour`` image of its size (clips stay
    clips of as many frames)."""
    def blank(frame: Any) -> Any:
        return Image.new("RGB", frame.size, colour)

    return [[blank(f) for f in image] if isinstance(image, (list, tuple)) else blank(image) for image in images]


# ------------------------------------------------------------------------------------- evaluator
class ImageUseEvaluator(Evaluator):
    """Answer loss and accuracy with the right, shuffled and blank images, and the gap, per question type."""

    Config = ImageUseConfig

    def data_aliases(self) -> list[str]:
        return list(self.config.data)

    def evaluate(self, model: Any, context: EvalContext) -> EvalResult:
        cfg = self.config
        types = read_question_types(cfg.question_types)
        tokenizer = model.decoder.tokenizer
        questions: list[HeldOutQuestion] = []
        for alias in cfg.data:
            questions += held_out_questions(context, alias, tokenizer, types=types, types_file=cfg.question_types,
                                            limit=cfg.limit, evaluator="image_use")
        sources = shuffled_sources([media_layout(q.sample.images) for q in questions],
                                   [media_fingerprint(q.sample.images) for q in questions], cfg.seed)
        skipped: list[dict[str, Any]] = []
        kept: list[tuple[HeldOutQuestion, HeldOutQuestion]] = []  # (question, the one it takes images from)
        for question, source in zip(questions, sources):
            if not question.sample.images:
                skipped.append({**question.item, "skipped": "the sample has no images"})
            elif source is None:
                skipped.append({**question.item, "skipped": "no other held-out sample of its media layout "
                                                            f"{list(media_layout(question.sample.images))} has different images"})
            else:
                kept.append((question, questions[source]))
        if not kept:
            raise VlmkitError(f"eval: image_use on {', '.join(cfg.data)}: no held-out question has images that another "
                              "question's (of as many images and frames) could replace; evaluate more records (limit)")
        colours = {alias: mean_colour([q.sample for q, _ in kept if q.item["data"] == alias])
                   for alias in dict.fromkeys(q.item["data"] for q, _ in kept)}
        variants = {
            "right": [q.sample for q, _ in kept],
            "shuffled": [replace(q.sample, images=list(source.sample.images)) for q, source in kept],
            "blank": [replace(q.sample, images=blank_images(q.sample.images, colours[q.item["data"]])) for q, _ in kept],
        }
        items = [{**q.item, "shuffled_from": source.item["id"], "blank_colour": list(colours[q.item["data"]]),
                  "tokens": 0, "nll": {}, "loss": {}, "predictions": {}, "correct": {}} for q, source in kept]
        for condition in CONDITIONS:
            samples = variants[condition]
            desc = f"{context.label}: image_use {condition}"
            for item, (total, count) in zip(items, _scores(model, samples, cfg.batch_size, context.progress, desc)):
                item["tokens"] = count
                item["nll"][condition] = -total
                item["loss"][condition] = -total / count if count else 0.0
            for alias in dict.fromkeys(item["data"] for item in items):
                rows = [k for k, item in enumerate(items) if item["data"] == alias]
                answers = generate(model, [split_prompt(samples[k])[0] for k in rows], context.templates.get(alias),
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                   progress=context.progress, desc=f"{desc} {alias}")
                for k, answer in zip(rows, answers):
                    items[k]["predictions"][condition] = answer
                    items[k]["correct"][condition] = exact_match(answer, items[k]["reference"])
        metrics, counts, curves = summarise(items)
        if skipped:
            counts["skipped"] = len(skipped)
        return EvalResult(name="image_use", metric="loss per answer token / accuracy by images", metrics=metrics,
                          counts=counts, items=items + skipped, curves=curves, x_label="images")


def _scores(model: Any, samples: list[Sample], batch_size: int, progress: bool, desc: str) -> list[tuple[float, int]]:
    """:func:`answer_loglikelihoods` of ``samples`` in order, batched among samples of one frame
    count (a batch holds pictures or clips, not both)."""
    by_frames: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_frames.setdefault(max(media_layout(sample.images), default=1), []).append(index)
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(samples)
    for indices in by_frames.values():
        for index, score in zip(indices, answer_loglikelihoods(model, [samples[i] for i in indices],
                                                               batch_size=batch_size, progress=progress, desc=desc)):
            scores[index] = score
    return scores


def summarise(items: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, int], dict[str, dict[str, float]]]:
    """Items with ``loss``/``nll``/``tokens``/``correct`` per condition -> (metrics, counts, curves).

    Rows: ``all: loss <condition>`` and ``all: acc <condition>`` for the three conditions, then
    ``<type>: loss gap`` and ``<type>: acc gap`` for ``all`` and each type (in order of first
    appearance). Loss is pooled over the answer tokens (total negative log-probability / tokens),
    accuracy is the share of exact answers."""
    groups: dict[str, list[dict[str, Any]]] = {"all": items}
    for item in items:
        groups.setdefault(item["type"], []).append(item)

    def loss(group: list[dict[str, Any]], condition: str) -> float:
        tokens = sum(item["tokens"] for item in group)
        return sum(item["nll"][condition] for item in group) / tokens if tokens else 0.0

    def acc(group: list[dict[str, Any]], condition: str) -> float:
        return sum(item["correct"][condition] for item in group) / len(group)

    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for condition in CONDITIONS:
        metrics[f"all: loss {condition}"] = loss(items, condition)
        counts[f"all: loss {condition}"] = len(items)
    for condition in CONDITIONS:
        metrics[f"all: acc {condition}"] = acc(items, condition)
        counts[f"all: acc {condition}"] = len(items)
    for name, group in groups.items():
        metrics[f"{name}: loss gap"] = loss(group, "shuffled") - loss(group, "right")
        metrics[f"{name}: acc gap"] = acc(group, "right") - acc(group, "shuffled")
        counts[f"{name}: loss gap"] = counts[f"{name}: acc gap"] = len(group)
    counts["all"] = len(items)
    curves = {"answer loss": {c: loss(items, c) for c in CONDITIONS},
              "accuracy": {c: acc(items, c) for c in CONDITIONS}}
    return metrics, counts, curves
