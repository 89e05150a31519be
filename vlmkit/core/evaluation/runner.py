"""Running a recipe's ``eval`` list on a model, writing and comparing the results.

Each evaluation ``label`` (``before``, ``after``, or a name given to ``recipes eval``) writes, per
evaluator, ``<out>/eval/<label>/<name>.json`` (metrics, counts and every item) and ``<name>.md``
(the table); ``<name>`` is the eval entry's ``name`` if it gives one, else what the evaluator calls
its result (its type), ``-2``, ``-3`` ... appended to a name already written. :func:`comparison` puts two evaluations side by side (markdown) and
:func:`comparison_plot` draws them as a bar chart (PNG).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.core.checkpoint import atomic_file, write_text_atomic
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import EvalContext, EvalResult

EVAL_DIR = "eval"


def run_evaluations(
    model: Any, resolved: Any, output_dir: Path, label: str, *, registry: Any = None, progress: bool = True,
) -> list[EvalResult]:
    """Every evaluator of ``resolved``'s ``eval`` list on ``model``; results written under
    ``output_dir/eval/<label>/``."""
    if registry is None:
        from vlmkit.core.registry import get_registry

        registry = get_registry()
    evaluators = [registry.component_class("evaluator", spec.name)(spec.config) for spec in resolved.evaluators]
    aliases = list(dict.fromkeys(a for ev in evaluators for a in ev.data_aliases()))
    from vlmkit.core.data.build import build_dataset

    datasets = {a: build_dataset(registry, a, resolved.datasets[a]) for a in aliases}
    folder = Path(output_dir) / EVAL_DIR / label
    context = EvalContext(datasets=datasets, templates=dict(model.templates), output_dir=folder, label=label,
                          progress=progress)
    results = []
    names: dict[str, int] = {}
    for evaluator, spec in zip(evaluators, resolved.evaluators):
        result = evaluator.evaluate(model, context)
        if spec.entry_name is not None:  # the entry's own name (eval: - {type: ..., name: ...})
            result.name = spec.entry_name
        names[result.name] = names.get(result.name, 0) + 1
        if names[result.name] > 1:  # two entries of one type: instructions, instructions-2
            result.name = f"{result.name}-{names[result.name]}"
        write_result(result, folder)
        results.append(result)
    return results


def _atomic_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def write_result(result: EvalResult, folder: Path) -> None:
    payload = {"name": result.name, "metric": result.metric, "metrics": result.metrics, "counts": result.counts,
               "curves": result.curves, "x_label": result.x_label, "examples": result.examples, "items": result.items}
    _atomic_text(folder / f"{result.name}.json", json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    _atomic_text(folder / f"{result.name}.md", table([result], [folder.name]) + "\n")
    comparison_plot([result], [folder.name], folder / f"{result.name}.png")


def read_result(path: Path) -> EvalResult:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return EvalResult(name=data["name"], metric=data["metric"], metrics=data["metrics"], counts=data.get("counts", {}),
                          items=data.get("items", []), examples=data.get("examples", []), curves=data.get("curves", {}),
                          x_label=data.get("x_label", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VlmkitError(f"'{path}': not a readable evaluation result: {exc}") from None


def table(results: list[EvalResult], labels: list[str]) -> str:
    """One evaluator's results (one per label, same evaluator) as a markdown table, rows = metrics."""
    first = results[0]
    rows = list(dict.fromkeys(k for r in results for k in r.metrics))
    head = f"| {first.name}: {first.metric} | " + " | ".join(labels) + " | n |"
    lines = [head, "|" + "---|" * (len(labels) + 2)]
    for row in rows:
        values = " | ".join(f"{r.metrics[row]:.3f}" if row in r.metrics else "-" for r in results)
        n = next((r.counts[row] for r in results if row in r.counts), "")
        lines.append(f"| {row} | {values} | {n} |")
    return "\n".join(lines)


def examples_table(results: list[EvalResult], labels: list[str]) -> str:
    """The first result's example items with each label's answer (markdown)."""
    by_id = [{item["id"]: item for item in r.items} for r in results]
    lines = ["| question | reference | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for item_id in results[0].examples:
        item = by_id[0].get(item_id)
        if item is None:
            continue
        answers = []
        for items in by_id:
            other = items.get(item_id)
            answers.append("-" if other is None else f"{_cell(other.get('prediction', ''))} {'✓' if other.get('correct') else '✗'}")
        lines.append(f"| {_cell(item.get('question') or item_id)} | {_cell(item.get('reference', ''))} | " + " | ".join(answers) + " |")
    return "\n".join(lines)


def _cell(text: Any) -> str:
    text = str(text).replace("\n", " ").replace("|", "\\|").strip()
    return (text[:77] + "...") if len(text) > 80 else (text or '""')


def comparison(before: list[EvalResult], after: list[EvalResult], labels: tuple[str, str] = ("before", "after")) -> str:
    """Markdown: each evaluator's table before/after, then its example questions with both answers.
    Results are paired by name (the order of ``before`` may be another, e.g. read back from files);
    a result without a partner is shown alone."""
    parts = []
    earlier = {b.name: b for b in before}
    for a in after:
        b = earlier.get(a.name)
        if b is None:
            parts.append(table([a], [labels[1]]))
            continue
        parts.append(table([b, a], list(labels)))
        if a.examples:
            parts.append(examples_table([a, b], [labels[1], labels[0]]))
    return "\n\n".join(parts)


def comparison_plot(results: list[EvalResult], labels: list[str], path: Path, title: str | None = None) -> Path:
    """One evaluator's results under several labels as a PNG: lines per curve and label when the
    results have ``curves`` (accuracy against shots ...), else grouped bars per metric row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(r.curves for r in results):
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        styles = ["-", "--", ":", "-."]
        for j, (result, label) in enumerate(zip(results, labels)):
            for c, (curve, points) in enumerate(result.curves.items()):
                xs = list(points)
                numeric = all(_is_number(x) for x in xs)
                ax.plot([float(x) for x in xs] if numeric else xs, list(points.values()), styles[c % len(styles)],
                        marker="o", color=f"C{j}", label=f"{label}: {curve}" if len(result.curves) > 1 or len(results) > 1 else curve)
        ax.set_xlabel(results[0].x_label)
    else:
        rows = list(dict.fromkeys(k for r in results for k in r.metrics))
        width = 0.8 / max(1, len(results))
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.6))
        for j, (result, label) in enumerate(zip(results, labels)):
            xs = [i + (j - (len(results) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [result.metrics.get(r, 0.0) for r in rows], width=width, label=label)
        ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right")
    top = max([v for r in results for v in r.metrics.values()] + [1.0])
    ax.set_ylim(0, 1.02 * top)
    ax.set_ylabel(results[0].metric)
    ax.set_title(title or results[0].name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
