"""Answers from a model: a rendered sample cut into prompt and target, batched greedy generation.

A template's trained segments are the answers (and their end markers), so the prompt of a sample
is everything before its last run of trained segments, and that run is the query's answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import IMAGE_TOKEN, Sample


def split_prompt(sample: Sample) -> tuple[Sample, str]:
    """``sample`` -> (the sample up to its final answer, that answer's text with its end markers)."""
    segments = list(sample.segments)
    end = len(segments)
    while end > 0 and segments[end - 1][1]:
        end -= 1
    if end == len(segments):
        raise VlmkitError(f"sample '{sample.id}': it has no trained answer at its end, so there is nothing to generate")
    prompt = Sample(id=sample.id, images=list(sample.images), segments=segments[:end], units=list(sample.units))
    return prompt, "".join(text for text, _ in segments[end:])


def stop_token_ids(tokenizer: Any, template: Any) -> list[int]:
    """The end-of-sequence id and the ids of the template's answer-ending tokens."""
    ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    for token in getattr(template, "stop_tokens", ()):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(int(token_id))
    return list(dict.fromkeys(ids))


def clean_answer(text: str, tokenizer: Any) -> str:
    """Generated text up to the first special token, stripped."""
    cut = len(text)
    for token in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})):
        if token and token in text:
            cut = min(cut, text.index(token))
    return text[:cut].strip()


def generate(
    model: Any,
    prompts: Sequence[Sample],
    template: Any,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    num_beams: int = 1,
    length_penalty: float | None = None,
    progress: bool = False,
    desc: str = "generating",
    on_batch: Callable[[int], None] | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Greedy (or beam) answers to ``prompts``, batched with left padding, in order. Media of one
    batch must have the same frame count: prompts are grouped by it. ``length_penalty`` (beam
    search only): beam scores are summed log-probabilities divided by length ** it (transformers'
    default 1.0 when unset). ``options``: more keyword arguments for the model's ``generate``
    (``do_sample``, ``temperature``, a ``streamer``, ``stopping_criteria``); they replace these
    defaults."""
    tokenizer = model.decoder.tokenizer
    collator = model.collator(padding_side="left", prompts=True)
    stops = stop_token_ids(tokenizer, template)
    device = next(model.parameters()).device
    beam_options = {"length_penalty": length_penalty} if num_beams > 1 and length_penalty is not None else {}

    def frames(sample: Sample) -> int:
        return max((len(img) if isinstance(img, list) else 1 for img in sample.images), default=1)

    order = sorted(range(len(prompts)), key=lambda i: frames(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        groups: dict[int, list[int]] = {}
        for i in chunk:
            groups.setdefault(frames(prompts[i]), []).append(i)
        batches.extend(groups.values())
    was_training = model.training
    model.eval()
    try:
        for batch_ids in tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            batch = collator([prompts[i] for i in batch_ids])
            tensors = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "vision_x", "media_mask")}
            with torch.no_grad():
                kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": num_beams,
                          "eos_token_id": stops, "pad_token_id": tokenizer.pad_token_id, **beam_options, **(options or {})}
                new = model.generate(**tensors, **kwargs)
            for i, row in zip(batch_ids, new):
                answers[i] = clean_answer(tokenizer.decode(row, skip_special_tokens=False), tokenizer)
            if on_batch is not None:
                on_batch(len(batch_ids))
    finally:
        model.train(was_training)
    return answers
