"""Run folders: which folders a run may write into, and cleaning up after a killed run.

A run folder carries the marker file ``.vlmkit-run`` (JSON: format, recipe name, creation time,
vlmkit version), written atomically when the run starts. ``recipes run --output-dir DIR``:

- ``DIR`` does not exist or is empty: it becomes a run folder;
- ``DIR`` has the marker (or, from vlmkit versions before the marker, complete checkpoints under
  ``checkpoints/``): it is this run's folder (resumed, or refused if it holds another recipe's
  checkpoints, as before);
- anything else is someone's folder and is refused, untouched, unless ``overwrite`` is given. Then
  the run writes there, but never deletes or rewrites a file it did not create: any file or folder
  at one of the paths the run writes (:data:`RUN_PATHS`) is first renamed to
  ``<name>.pre-vlmkit-<time>``; every other file is left alone.

At the start of a run, the temporary files and folders that a killed run leaves (always named
after vlmkit's own files, e.g. ``checkpoints/.step-00000012.tmp-x1y2``, ``.export.tmp-x1y2``,
``.metrics.jsonl.x1y2.tmp``) are removed; nothing else is.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from vlmkit.core.checkpoint import write_text_atomic
from vlmkit.core.errors import VlmkitError

MARKER = ".vlmkit-run"
MARKER_FORMAT = "vlmkit-run"
#: what a run writes at the top of its folder (besides the marker)
RUN_PATHS = ("recipe.yaml", "metrics.jsonl", "loss.png", "tensorboard", "checkpoints", "export", "eval")

_STEP_DIR = re.compile(r"^step-\d{8}$")
# temporaries of vlmkit's own writes: atomic folders (.NAME.tmp-XXXX, .NAME.old-PID) and files
# (.NAME.XXXX.tmp from tempfile.mkstemp)
_ROOT_TEMP = re.compile(r"^\.(export)\.(tmp|old)-[A-Za-z0-9_]+$"
                        r"|^\.(loss\.png|metrics\.jsonl|recipe\.yaml|vlmkit-run)\.[A-Za-z0-9_]+\.tmp$")
_CHECKPOINT_TEMP = re.compile(r"^\.step-\d{8}\.(tmp|old)-[A-Za-z0-9_]+$")


def is_run_folder(folder: Path) -> bool:
    """``folder`` has the run marker, or complete checkpoints of a run from before the marker."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    checkpoints = folder / "checkpoints"
    return checkpoints.is_dir() and any(
        p.is_dir() and _STEP_DIR.match(p.name) and (p / "trainer.json").is_file() for p in checkpoints.iterdir()
    )


def check_run_folder(folder: Path, overwrite: bool) -> str:
    """What ``folder`` is: ``"new"`` (missing or empty), ``"run"`` (a run folder) or ``"foreign"``
    (someone's non-empty folder; only with ``overwrite``, else an error). Writes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VlmkitError(f"--output-dir {folder}: is a file, not a folder; choose a folder for the run")
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    if is_run_folder(folder):
        return "run"
    if not overwrite:
        raise VlmkitError(
            f"--output-dir {folder}: the folder is not empty and is not a vlmkit run folder (it has no {MARKER} "
            "file), so the run does not write there and nothing in it was changed; choose a new or empty folder, or "
            "pass --overwrite (overwrite=True from Python) to run there anyway (vlmkit then renames any file of its own names there, such as "
            "recipe.yaml, metrics.jsonl, checkpoints/ or export/, to <name>.pre-vlmkit-<time>, and never deletes or "
            "changes any other file)"
        )
    return "foreign"


def prepare_run_folder(folder: Path, kind: str, recipe_name: str) -> list[str]:
    """Make ``folder`` a run folder (``kind`` from :func:`check_run_folder`): move aside what a
    ``"foreign"`` folder holds at the run's own paths, write the marker if missing, and remove the
    temporaries of a killed run. Returns one line per thing moved or removed, for the user."""
    folder = Path(folder)
    notes: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "foreign":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in RUN_PATHS:
            path = folder / name
            if path.exists() or path.is_symlink():
                aside = _free_name(folder, f"{name}.pre-vlmkit-{stamp}")
                path.rename(aside)
                notes.append(f"--overwrite: moved the existing {name} aside to {aside.name} (nothing is deleted)")
    if not (folder / MARKER).is_file():
        write_marker(folder, recipe_name)
    notes += [f"removed {p.relative_to(folder)}, left by an interrupted run" for p in clean_stale_temporaries(folder)]
    return notes


def write_marker(folder: Path, recipe_name: str) -> Path:
    """Write ``folder/.vlmkit-run`` atomically (:func:`~vlmkit.core.checkpoint.write_text_atomic`)."""
    import vlmkit

    data = {
        "format": MARKER_FORMAT,
        "recipe": recipe_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vlmkit_version": vlmkit.__version__,
        "note": "this folder is a vlmkit run folder: `recipes run` resumes and rewrites the files it wrote here",
    }
    return write_text_atomic(Path(folder) / MARKER, json.dumps(data, indent=1) + "\n")


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries a killed run left in run folder ``folder`` (only names of vlmkit's
    own temporary pattern: ``.export.tmp-*``, ``checkpoints/.step-*.tmp-*``, ...); the removed
    paths."""
    folder = Path(folder)
    removed: list[Path] = []
    places = [(folder, _ROOT_TEMP), (folder / "checkpoints", _CHECKPOINT_TEMP)]
    for place, pattern in places:
        if not place.is_dir():
            continue
        for path in sorted(place.iterdir()):
            if pattern.match(path.name) and not path.is_symlink():
                _remove(path)
                removed.append(path)
    export = folder / "export"
    if export.is_dir():
        from vlmkit.core.export import stale_entries

        for path in stale_entries(export):
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _free_name(folder: Path, name: str) -> Path:
    candidate, n = folder / name, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = folder / f"{name}-{n}"
    return candidate
