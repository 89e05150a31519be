"""The model card the web app shows beside the chat: the recipe, its components, the stages that
trained the model and the last evaluation's table from the run folder (markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.core.evaluation.runner import EVAL_DIR
from vlmkit.core.export import EXPORT_JSON
from vlmkit.core.recipe.schema import COMPONENTS


def last_evaluation(run_folder: Path) -> tuple[str, str] | None:
    """(where, markdown) of the newest evaluation in ``run_folder/eval/``: ``summary.md`` (what
    ``recipes run`` writes) or the tables of one ``recipes eval --label`` folder, whichever was
    written last; ``None`` when there is none."""
    folder = Path(run_folder) / EVAL_DIR
    if not folder.is_dir():
        return None
    found: list[tuple[float, str, str]] = []
    summary = folder / "summary.md"
    if summary.is_file():
        found.append((summary.stat().st_mtime, str(summary), summary.read_text(encoding="utf-8")))
    for label in sorted(p for p in folder.iterdir() if p.is_dir()):
        tables = sorted(label.glob("*.md"))
        if tables:
            newest = max(t.stat().st_mtime for t in tables)
            found.append((newest, str(label), "\n\n".join(t.read_text(encoding="utf-8").strip() for t in tables)))
    if not found:
        return None
    _, where, text = max(found, key=lambda item: item[0])
    return where, text


def model_card(export: Path, resolved: Any) -> str:
    """The card as markdown."""
    export = Path(export)
    recipe = resolved.recipe
    lines = [f"### {recipe.name}", ""]
    if getattr(recipe, "description", None):
        lines += [str(recipe.description).strip(), ""]
    lines += [f"profile: `{resolved.profile or '(none)'}` · export: `{export}`", "", "**Components**", ""]
    try:
        trained = json.loads((export / EXPORT_JSON).read_text(encoding="utf-8")).get("components", {})
    except (OSError, ValueError):
        trained = {}
    for kind in COMPONENTS:
        spec = resolved.components.get(kind)
        if spec is None:
            continue
        notes = "; ".join(trained.get(kind, [])) if isinstance(trained.get(kind), list) else ""
        lines.append(f"- {kind}: `{spec.name}`" + (f" — {notes}" if notes else ""))
    lines += ["", "**Trained stages**", ""]
    for stage in recipe.stages:
        if not stage.enabled:
            lines.append(f"- {stage.name}: skipped (enabled: false)")
            continue
        tune = ", ".join(f"{c} {getattr(stage.tune, c).mode}" for c in COMPONENTS)
        steps = f", {stage.max_steps} steps" if getattr(stage, "max_steps", None) else ""
        lines.append(f"- {stage.name}: data {', '.join(stage.data)}; {tune}{steps}")
    run_folder = export.parent if export.name == "export" else export
    evaluation = last_evaluation(run_folder)
    lines += ["", "**Last evaluation**", ""]
    if evaluation is None:
        lines.append(f"none found in `{run_folder / EVAL_DIR}`")
    else:
        where, text = evaluation
        lines += [f"from `{where}`", "", text.strip()]
    return "\n".join(lines) + "\n"
