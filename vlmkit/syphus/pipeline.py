"""The Syphus run: annotations -> prompts -> (cached) LLM calls -> parsed, filtered pairs -> linked,
translated -> MIMIC-IT files. See :mod:`vlmkit.syphus`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vlmkit.core.errors import VlmkitError
from vlmkit.llm_backends.base import Completion, LLMBackend
from vlmkit.syphus.annotations import Annotation, read_annotations
from vlmkit.syphus.cache import CallCache, call_key
from vlmkit.syphus.filters import FilterConfig, PairFilter
from vlmkit.syphus.linking import LinkingConfig, link
from vlmkit.syphus.parse import OutputFormat, ParseError, parse_answer
from vlmkit.syphus.task import Task
from vlmkit.syphus.translate import LANGUAGES, translation_messages
from vlmkit.syphus.writer import BadMedia, atomic_write_text, encode_image, write_images_parquet, write_json

__all__ = ["GenerateConfig", "GenerateResult", "generate", "MARKER"]

#: the file that marks a folder as a Syphus output (it may be written into again)
MARKER = ".vlmkit-syphus"


class GenerateConfig(BaseModel):
    """Settings of a run besides the task and the backend (``--config FILE``)."""

    model_config = ConfigDict(extra="forbid")

    filters: FilterConfig = FilterConfig()
    linking: LinkingConfig = LinkingConfig()
    image_size: int = Field(224, ge=16, le=1024)
    """Images are stored square at this size (MIMIC-IT: 224)."""


@dataclass
class GenerateResult:
    out: Path
    items: int = 0                      # annotation items prompted
    parsed_items: int = 0               # answers with at least one pair
    pairs: int = 0                      # kept (English) pairs
    translations: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    calls: int = 0                      # LLM calls made in this run
    cached: int = 0                     # answers taken from the cache
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


class _Run:
    def __init__(self, backend: LLMBackend | None, cache: CallCache | None, progress: bool):
        self.backend, self.cache, self.progress = backend, cache, progress
        self.calls = self.cached = self.prompt_tokens = self.completion_tokens = 0

    def ask(self, prompts: list[list[dict[str, str]]], desc: str) -> list[Completion]:
        """Answers for every prompt: from the cache, else from the backend (each stored on arrival)."""
        from tqdm import tqdm

        assert self.backend is not None and self.cache is not None
        identity = self.backend.identity()
        keys = [call_key(identity, p) for p in prompts]
        answers: list[Completion | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, a in enumerate(answers) if a is None]
        self.cached += len(prompts) - len(todo)
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc, unit="call",
                   disable=not self.progress, dynamic_ncols=True)
        tokens_in = tokens_out = 0
        try:
            for j, completion in self.backend.complete([prompts[i] for i in todo]):
                i = todo[j]
                self.cache.put(keys[i], completion)
                answers[i] = completion
                self.calls += 1
                tokens_in += completion.prompt_tokens
                tokens_out += completion.completion_tokens
                postfix = {"tok_in": tokens_in, "tok_out": tokens_out}
                if bar.format_dict.get("elapsed"):
                    postfix["tok/s"] = f"{tokens_out / max(bar.format_dict['elapsed'], 1e-9):.1f}"
                price = self.backend.price_per_1k
                if price is not None:
                    postfix["cost"] = f"{(tokens_in * price[0] + tokens_out * price[1]) / 1000:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
        finally:
            bar.close()
            self.prompt_tokens += tokens_in
            self.completion_tokens += tokens_out
        return [a for a in answers if a is not None]


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise VlmkitError(f"--out: '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise VlmkitError(f"--out: '{out}' is not empty and is not a Syphus output folder (it has no {MARKER}); "
                          "give a new or empty folder, nothing there is overwritten")


def generate(task: Task, annotations: Path, out: Path, backend: LLMBackend | None, *,
             config: GenerateConfig | None = None, languages: list[str] = (), limit: int | None = None,
             dry_run: bool = False, cache_dir: Path | None = None, progress: bool = True) -> GenerateResult:
    """Run the pipeline; ``backend`` may be None only for ``dry_run`` (prompts are written, nothing is asked)."""
    config = config or GenerateConfig()
    start = time.monotonic()
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise VlmkitError(f"--languages: unknown {', '.join(unknown)}; allowed: {', '.join(LANGUAGES)}")
    out = Path(out)
    _check_out(out)
    good, bad = read_annotations(annotations)
    rejects: list[dict[str, Any]] = [{"reason": b.reason, "item": b.item_id, "where": b.where, "problem": b.problem}
                                     for b in bad]
    items: list[tuple[Annotation, list[Path]]] = []
    for ann, media in good:
        why = task.accepts(ann)
        if why is not None:
            rejects.append({"reason": "wrong_media_count", "item": ann.id, "problem": why})
        else:
            items.append((ann, media))
    if limit is not None:
        items = items[:limit]
    result = GenerateResult(out=out, items=len(items), dry_run=dry_run)
    prompts = [task.messages(ann) for ann, _ in items]
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("vlmkit syphus output\n", encoding="utf-8")
    prefix = task.prefix
    if dry_run:
        lines = [json.dumps({"item": ann.id, "messages": p}, ensure_ascii=False) for (ann, _), p in zip(items, prompts)]
        atomic_write_text(out / f"{prefix}_prompts.jsonl", "\n".join(lines) + ("\n" if lines else ""))
        atomic_write_text(out / f"{prefix}_rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        result.files = [f"{prefix}_prompts.jsonl", f"{prefix}_rejects.jsonl"]
        result.rejects = _count(rejects)
        result.seconds = time.monotonic() - start
        return result
    if backend is None:
        raise VlmkitError("generate: a backend is needed unless dry_run")
    run = _Run(backend, CallCache(cache_dir or out / "cache"), progress)

    answers = run.ask(prompts, f"{task.name}")
    pair_filter = PairFilter.for_annotations(config.filters, [ann for ann, _ in good])
    kept: list[dict[str, Any]] = []   # {item, instruction, answer}
    images: dict[str, list[str]] = {}
    image_rows: list[tuple[str, bytes]] = []
    for (ann, media), answer in zip(items, answers):
        try:
            pairs = parse_answer(answer.text, task.output, ann.id)
        except ParseError as exc:
            rejects.append({"reason": "parse_failure", "item": ann.id, "problem": str(exc), "raw": answer.text})
            continue
        result.parsed_items += 1
        extra = pairs[task.output.max_pairs:]
        pairs = pairs[:task.output.max_pairs]
        for q, a in extra:
            rejects.append({"reason": "extra_pair", "item": ann.id, "instruction": q, "answer": a})
        reasons = pair_filter.check_item(ann, pairs)
        item_pairs = []
        for (q, a), reason in zip(pairs, reasons):
            if reason is None:
                item_pairs.append({"item": ann.id, "instruction": q, "answer": a})
            else:
                entry = {"reason": reason, "item": ann.id, "instruction": q, "answer": a}
                if reason == "ungrounded":
                    entry["problem"] = "names " + ", ".join(pair_filter.ungrounded_words(ann, q + " " + a))
                rejects.append(entry)
        if not item_pairs:
            continue
        try:
            ids = [f"{prefix}_IMG_{ann.id}"] if len(media) == 1 else [f"{prefix}_IMG_{ann.id}_{k:04d}" for k in range(len(media))]
            rows = [(image_id, encode_image(path, config.image_size)) for image_id, path in zip(ids, media)]
        except BadMedia as exc:
            for p in item_pairs:
                rejects.append({"reason": "bad_media", **p, "problem": str(exc)})
            continue
        images[ann.id] = ids
        image_rows.extend(rows)
        kept.extend(item_pairs)

    ins_ids = [f"{prefix}_INS_{n + 1:05d}" for n in range(len(kept))]
    related = link(ins_ids, [p["item"] for p in kept], [p["instruction"] for p in kept], config.linking) if kept else {}
    data = {ins_id: {"instruction": p["instruction"], "answer": p["answer"], "image_ids": images[p["item"]],
                     "rel_ins_ids": related[ins_id]} for ins_id, p in zip(ins_ids, kept)}
    meta = {"version": "vlmkit-syphus-1", "author": "vlmkit syphus", "task": task.name, "group": task.group,
            "language": "en", "backend": backend.identity(), "annotations": str(annotations)}
    files = [f"{prefix}_instructions.json", f"{prefix}_train.json", f"{prefix}.parquet"]
    write_images_parquet(out / f"{prefix}.parquet", image_rows)
    write_json(out / f"{prefix}_instructions.json", {"meta": meta, "data": data})
    write_json(out / f"{prefix}_train.json", {k: v["rel_ins_ids"] for k, v in data.items()})
    result.pairs = len(data)

    for lang in languages:
        order = list(data)
        msgs = [translation_messages(lang, data[i]["instruction"], data[i]["answer"], task.output.question_marker,
                                     task.output.answer_marker) for i in order]
        replies = run.ask(msgs, f"{task.name} -> {lang}")
        fmt = OutputFormat(format="qa_pairs", question_marker=task.output.question_marker,
                           answer_marker=task.output.answer_marker)
        translated: dict[str, dict[str, Any]] = {}
        for ins_id, reply in zip(order, replies):
            try:
                pairs = parse_answer(reply.text, fmt, ins_id)
            except ParseError as exc:
                rejects.append({"reason": "translation_parse_failure", "language": lang, "id": ins_id,
                                "problem": str(exc), "raw": reply.text})
                continue
            q, a = pairs[0]
            source = data[ins_id]
            if not q or not a:
                rejects.append({"reason": "translation_empty", "language": lang, "id": ins_id, "raw": reply.text})
                continue
            if (q.strip().lower(), a.strip().lower()) == (source["instruction"].lower(), source["answer"].lower()):
                rejects.append({"reason": "translation_unchanged", "language": lang, "id": ins_id, "raw": reply.text})
                continue
            translated[ins_id] = {"instruction": q, "answer": a, "image_ids": source["image_ids"],
                                  "rel_ins_ids": source["rel_ins_ids"]}
        for entry in translated.values():   # links only to pairs this language file holds
            entry["rel_ins_ids"] = [r for r in entry["rel_ins_ids"] if r in translated]
        write_json(out / f"{prefix}_instructions_{lang}.json", {"meta": {**meta, "language": lang}, "data": translated})
        write_json(out / f"{prefix}_train_{lang}.json", {k: v["rel_ins_ids"] for k, v in translated.items()})
        files += [f"{prefix}_instructions_{lang}.json", f"{prefix}_train_{lang}.json"]
        result.translations[lang] = len(translated)

    atomic_write_text(out / f"{prefix}_rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    result.rejects = _count(rejects)
    result.calls, result.cached = run.calls, run.cached
    result.prompt_tokens, result.completion_tokens = run.prompt_tokens, run.completion_tokens
    result.seconds = time.monotonic() - start
    result.files = files + [f"{prefix}_rejects.jsonl", f"{prefix}_report.json"]
    write_json(out / f"{prefix}_report.json", result.as_dict())
    return result


def _count(rejects: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return dict(sorted(counts.items()))
