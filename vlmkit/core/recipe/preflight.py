"""Checks of a validated recipe against the files a run needs, made when the run starts (before any
model is built), not when a recipe validates: ``recipes validate`` checks recipes on machines
without the data.

- Every enabled stage that has not started yet and has ``init_from`` needs its file. A missing file
  is an error naming the field (``stages.<stage name>.init_from.path``), the path, where the file
  comes from (the recipe's ``init_from.source``), and the two ways on: put the file there, or start
  without it (``init_from=null``, and enable the stages before it that are disabled because it
  replaces them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlmkit.core.errors import RecipeError


def check_init_from_files(resolved: Any, from_stage: int = 0) -> None:
    """Raise :class:`RecipeError` if an enabled stage from index ``from_stage`` on (the stages a
    resumed run has not started) has an ``init_from`` file that does not exist."""
    stages = resolved.recipe.stages
    problems = []
    for k, stage in enumerate(stages):
        if k < from_stage or not stage.enabled or stage.init_from is None:
            continue
        path = Path(stage.init_from.path).expanduser()
        if path.is_file():
            continue
        problems.append(_missing(stage, path, [s.name for s in stages[:k] if not s.enabled]))
    if problems:
        label = f"{resolved.source} (profile {resolved.profile})" if resolved.profile else resolved.source
        raise RecipeError(label, problems)


def _missing(stage: Any, path: Path, disabled_before: list[str]) -> str:
    field = f"stages.{stage.name}.init_from"
    init = stage.init_from
    where = f"'{path}'" if path.is_absolute() else f"'{path}' (relative to the working directory {os.getcwd()})"
    what = "is a folder, not a file" if path.is_dir() else "does not exist"
    data_root = os.environ.get("VLMKIT_DATA_ROOT") or "data"
    root_note = (f" (${{data_root}} is $VLMKIT_DATA_ROOT, else ./data: here '{data_root}')"
                 if str(path).startswith(str(Path(data_root).expanduser())) else "")
    source = f" ({init.source})" if init.source else ""
    without = [f"--set {field}=null"] + [f"--set stages.{name}.enabled=true" for name in disabled_before]
    return (
        f"{field}.path: {where} {what}. This stage starts from {init.format} weights{source}: put the file "
        f"there{root_note}, or give its place with --set {field}.path=FILE. To train without it instead: "
        + " ".join(without)
    )
