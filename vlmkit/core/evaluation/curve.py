"""The learning curve of a run: each evaluator's headline value against the global step.

With ``run.eval_every: N`` the engine runs the recipe's eval list every ``N`` optimizer steps of
every stage, under the label ``step-<global step>`` (``<run>/eval/step-120/`` ...). Together with
``before`` (step 0, with ``run.eval_before``) and ``after`` (the last step) these are the points of
the curve; :func:`write_learning_curve` draws ``<run>/learning_curve.png`` (one panel per
evaluator, one line per metric row) and writes the same numbers to ``<run>/eval/learning_curve.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vlmkit.core.checkpoint import atomic_file
from vlmkit.core.evaluation.runner import EVAL_DIR, read_result

__all__ = [
    "STEP_LABEL", "step_label", "learning_curve_points", "write_learning_curve", "drop_step_evaluations_after",
    "CURVE_PLOT", "CURVE_FILE",
]

CURVE_PLOT = "learning_curve.png"
CURVE_FILE = "learning_curve.json"
STEP_LABEL = re.compile(r"^step-(\d+)$")


def step_label(global_step: int) -> str:
    """The evaluation label of the evaluation after ``global_step`` optimizer steps."""
    return f"step-{global_step}"


def _step_folders(output_dir: Path) -> dict[int, Path]:
    folder = Path(output_dir) / EVAL_DIR
    steps: dict[int, Path] = {}
    if folder.is_dir():
        for sub in folder.iterdir():
            match = STEP_LABEL.match(sub.name)
            if match and sub.is_dir():
                steps[int(match.group(1))] = sub
    return steps


def drop_step_evaluations_after(output_dir: Path, global_step: int) -> list[Path]:
    """Remove the ``eval/step-<n>`` folders with ``n > global_step`` that an earlier run of this
    run folder wrote (vlmkit's own results: a fresh start passes 0, a resumed run its checkpoint's
    step), so that the curve holds this run's evaluations only. Returns the folders removed."""
    import shutil

    removed = []
    for step, sub in sorted(_step_folders(output_dir).items()):
        if step > global_step:
            shutil.rmtree(sub)
            removed.append(sub)
    return removed


def learning_curve_points(output_dir: Path, final_step: int) -> dict[str, dict[str, dict[int, float]]]:
    """evaluator result name -> metric row -> {global step: value}, from ``<output_dir>/eval/``:
    ``before`` at step 0, every ``step-<n>`` at ``n``, ``after`` at ``final_step``. Empty when the
    run has no evaluation during training (a curve of before and after alone is the tables' job)."""
    folder = Path(output_dir) / EVAL_DIR
    steps = _step_folders(output_dir)
    if not steps:
        return {}
    if (folder / "before").is_dir():
        steps.setdefault(0, folder / "before")
    if (folder / "after").is_dir():
        steps[final_step] = folder / "after"
    points: dict[str, dict[str, dict[int, float]]] = {}
    for step in sorted(steps):
        for file in sorted(steps[step].glob("*.json")):
            result = read_result(file)
            for row, value in result.metrics.items():
                points.setdefault(result.name, {}).setdefault(row, {})[step] = float(value)
    return points


def write_learning_curve(output_dir: Path, final_step: int) -> Path | None:
    """Draw ``learning_curve.png`` and write ``eval/learning_curve.json`` in ``output_dir`` (each
    atomically); returns the PNG's path, or None when there is nothing to draw."""
    points = learning_curve_points(output_dir, final_step)
    if not points:
        return None
    output_dir = Path(output_dir)
    data = {name: {row: {str(s): v for s, v in values.items()} for row, values in rows.items()}
            for name, rows in points.items()}
    _atomic_bytes(output_dir / EVAL_DIR / CURVE_FILE, (json.dumps(data, indent=1) + "\n").encode("utf-8"))
    figure = _figure(points, title=output_dir.name)
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    target = output_dir / CURVE_PLOT
    _atomic_bytes(target, buffer.getvalue())
    return target


#: an evaluator with more rows than this is drawn with its overall rows only ("all", "all: ...")
MAX_PLOTTED_ROWS = 10


def plotted_rows(rows: dict[str, Any]) -> list[str]:
    """The rows of one evaluator that its panel draws: every row, or, beyond
    :data:`MAX_PLOTTED_ROWS` rows, those named ``all`` or ``all: ...`` where there are any (the
    per-type rows stay in the JSON)."""
    overall = [row for row in rows if row == "all" or row.startswith("all:")]
    return list(rows) if len(rows) <= MAX_PLOTTED_ROWS or not overall else overall


def _figure(points: dict[str, dict[str, dict[int, float]]], title: str) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.6 * len(points)), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (name, rows) in enumerate(points.items()):
        axes = figure.add_subplot(len(points), 1, index + 1)
        shown = plotted_rows(rows)
        for row in shown:
            values = rows[row]
            steps = sorted(values)
            axes.plot(steps, [values[s] for s in steps], marker="o", linewidth=2 if row == "all" else 1, label=row)
        magnitudes = [abs(v) for row in shown for v in rows[row].values()]
        if magnitudes and max(magnitudes) > 2 and min(magnitudes) < 0.5:
            axes.set_yscale("symlog", linthresh=0.1)  # an untrained loss of ~11 beside gaps of ~0.01
        axes.set_xlabel("global step")
        axes.set_ylabel(name if len(shown) == len(rows) else f"{name} (overall rows)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small", ncol=2)
    figure.suptitle(f"{title}: held-out evaluation during training")
    return figure


def _atomic_bytes(path: Path, payload: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(payload)
