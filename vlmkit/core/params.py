"""Parameter counts of a recipe per stage and component, from a model built on the meta device
(``recipes params``): what each stage trains, before any weight is downloaded."""

from __future__ import annotations

from typing import Any

from vlmkit.core.compose import build_model
from vlmkit.core.tuning import StageTuning


def stage_parameters(resolved: Any, registry: Any = None) -> list[tuple[str, dict[str, dict[str, int]]]]:
    """``[(stage name, {component: {trainable, frozen}})]`` for the enabled stages, in order
    (each stage's tuning applied on top of the previous one's, as the engine does)."""
    model = build_model(resolved, registry, meta=True)
    out = []
    previous = None
    for k, stage in enumerate(resolved.recipe.stages):
        if stage.enabled:
            previous = StageTuning(stage.tune, f"stages.{k}.tune").apply(model, previous)
            out.append((stage.name, previous.report))
    return out


def format_report(name: str, profile: str | None, stages: list[tuple[str, dict[str, dict[str, int]]]]) -> str:
    lines = [f"{name}" + (f" (profile {profile})" if profile else "") + ": parameters per stage (built on the meta device)"]
    for stage, report in stages:
        total = sum(c["trainable"] for c in report.values())
        lines.append(f"stage {stage}: {total:,} trainable ({total / 1e6:.2f}M)")
        lines.append(f"  {'part':<10} {'trainable':>16} {'frozen':>16}")
        for comp, counts in report.items():
            lines.append(f"  {comp:<10} {counts['trainable']:>16,} {counts['frozen']:>16,}")
    return "\n".join(lines)
