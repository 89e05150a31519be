"""The run log: the metrics of one run folder.

``metrics.jsonl`` holds one JSON record per logged optimizer step and is the source of truth:
each line is flushed and fsync'ed as it is written, a resumed run first drops the records past
its checkpoint (``truncate_after``), and the loss curve ``loss.png`` is drawn from the file itself,
so the picture and the numbers always agree. TensorBoard scalars are optional (the
``vlmkit[tensorboard]`` extra) and are written next to it under ``tensorboard/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlmkit.core.checkpoint import atomic_file, write_text_atomic
from vlmkit.core.errors import VlmkitError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"

#: keys every record carries, with their types (the engine's contract with this log)
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "stage": str,
    "stage_index": int,
    "step": int,
    "global_step": int,
    "loss": (int, float),
    "lr": (int, float),
    "samples_per_s": (int, float),
}
#: the record keys that become TensorBoard scalars, as f"{stage}/{key}" at the record's global step
SCALAR_KEYS = ("loss", "lr", "samples_per_s")


class RunLog:
    """Metrics of one run folder: JSONL (one record per logged step), optional TensorBoard scalars,
    and a loss-curve PNG drawn from the JSONL itself (so the two always agree).

    ``enabled=False`` (the non-main processes of a distributed run) makes every method a no-op
    that touches no file.
    """

    def __init__(self, output_dir: Path, *, tensorboard: bool = False, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.tensorboard = tensorboard and enabled
        self.metrics_path = self.output_dir / METRICS_FILE
        self.plot_path = self.output_dir / PLOT_FILE
        self.tensorboard_dir = self.output_dir / TENSORBOARD_DIR
        self._tail_checked = False
        self._writer: Any = None
        self._writer_class: Any = None
        self._purge_step: int | None = None
        self._closed = False
        if not enabled:
            return
        if self.tensorboard:
            # fail at the start of a run, not at its first logged step
            self._writer_class = _summary_writer_class()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    # -- writing -----------------------------------------------------------------------------

    def write(self, record: dict) -> None:
        """Append one record to metrics.jsonl (flushed and fsync'ed) and, with TensorBoard on,
        its loss, lr and samples_per_s as scalars ``{stage}/{key}`` at its global step."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError(f"RunLog for {self.output_dir} is closed")
        _check_record(record)
        line = json.dumps(record, default=_plain) + "\n"
        if not self._tail_checked:
            _repair_tail(self.metrics_path)
            self._tail_checked = True
        # opened per record: the fsync costs far more, and no handle outlives a crash or a rewrite
        with self.metrics_path.open("a", encoding="utf-8", newline="\n") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if self.tensorboard:
            writer = self._tensorboard_writer()
            for key in SCALAR_KEYS:
                writer.add_scalar(f"{record['stage']}/{key}", float(record[key]), int(record["global_step"]))

    def truncate_after(self, global_step: int) -> None:
        """Drop the records with ``global_step`` past the given one, so that a run resumed from the
        checkpoint of that step logs no step twice. The file is rewritten atomically (a temporary
        file in the same folder, then ``os.replace``): a crash leaves either the old or the new file.
        TensorBoard's own events past that step are purged by the next writer (its purge_step)."""
        if not self.enabled:
            return
        if self.metrics_path.exists():
            kept = [line for line, record in _parse(self.metrics_path) if record["global_step"] <= global_step]
            _rewrite(self.metrics_path, kept)
        if self.tensorboard:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._purge_step = global_step + 1

    def plot(self) -> Path | None:
        """Draw output_dir/loss.png from metrics.jsonl: loss against global step, one line per
        stage (named in the legend), a dashed vertical line where each later stage starts.
        Returns its path, or None when there are no records (a stale loss.png is then removed)."""
        if not self.enabled:
            return None
        records = read_metrics(self.metrics_path)
        if not records:
            self.plot_path.unlink(missing_ok=True)
            return None
        figure = loss_figure(records, title=self.output_dir.name)
        with atomic_file(self.plot_path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
        return self.plot_path

    def close(self) -> None:
        """Close the JSONL file and the TensorBoard writer, then draw loss.png. Idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.plot()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _tensorboard_writer(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.tensorboard_dir), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (or of the run folder holding one), in file order.
    A missing file has no records. A last line that does not parse is what a crash in the
    middle of a write leaves, and is ignored; any other line that does not parse is an error."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    return [record for _, record in _parse(path)]


def loss_curve_data(records: Iterable[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """stage -> (global steps, losses), stages in the order of their stage_index (then of first
    appearance), each stage's points in global-step order: exactly the numbers loss.png draws."""
    order: dict[str, tuple[int, int]] = {}
    points: dict[str, list[tuple[int, float]]] = {}
    for position, record in enumerate(records):
        stage = record["stage"]
        order.setdefault(stage, (int(record.get("stage_index", 0)), position))
        points.setdefault(stage, []).append((int(record["global_step"]), float(record["loss"])))
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for stage in sorted(order, key=order.__getitem__):
        ordered = sorted(points[stage], key=lambda p: p[0])
        curves[stage] = ([s for s, _ in ordered], [v for _, v in ordered])
    return curves


def stage_boundaries(records: Iterable[dict]) -> list[int]:
    """The global step after which each stage but the first begins (``global_step - step`` of its
    records: exact whatever the logging interval), ascending."""
    starts: dict[str, tuple[int, int]] = {}
    for record in records:
        start = int(record["global_step"]) - int(record["step"])
        key = record["stage"]
        if key not in starts or start < starts[key][1]:
            starts[key] = (int(record.get("stage_index", 0)), start)
    ordered = sorted(starts.values())
    return sorted({start for _, start in ordered[1:]})


def loss_figure(records: list[dict], title: str | None = None) -> Any:
    """The matplotlib Figure of loss.png (no pyplot, no display: the Agg canvas draws it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for stage, (steps, losses) in loss_curve_data(records).items():
        axes.plot(steps, losses, label=stage, linewidth=1.5, marker="o" if len(steps) == 1 else None)
    for boundary in stage_boundaries(records):
        axes.axvline(boundary, color="0.5", linestyle="--", linewidth=1)
    axes.set_xlabel("global step")
    axes.set_ylabel("loss")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(title="stage")
    return figure


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise VlmkitError(
            "TensorBoard logging is on but the tensorboard package is not installed "
            f"({error}): install the extra with pip install 'vlmkit[tensorboard]', or turn TensorBoard logging off"
        ) from None
    return SummaryWriter


def _check_record(record: dict) -> None:
    if not isinstance(record, dict):
        raise TypeError(f"a run-log record is a dict, not {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"run-log record {record!r} lacks {', '.join(missing)}")
    for key, kind in REQUIRED_KEYS.items():
        value = _plain(record[key]) if hasattr(record[key], "item") else record[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"run-log record key {key!r} is {value!r}, expected {_kind_name(kind)}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _plain(value: Any) -> Any:
    """json.dumps' fallback: numpy and torch scalars become Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _parse(path: Path) -> Iterator[tuple[str, dict]]:
    """(line with its newline, record) per record line; blank lines are skipped."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == last:
                return  # cut short by a crash mid-write
            raise VlmkitError(
                f"{path}:{number + 1}: not a JSON record; the metrics file is damaged, delete or fix that line"
            ) from None
        if not isinstance(record, dict) or "global_step" not in record:
            if number == last and not line.endswith("\n"):
                return
            raise VlmkitError(f"{path}:{number + 1}: not a metrics record (a JSON object with a global_step)")
        if not line.endswith("\n"):
            line += "\n"
        yield line, record


def _repair_tail(path: Path) -> None:
    """Before appending: a file that does not end in a newline ends in a line cut short by a
    crash (dropped) or a complete record missing its newline (kept); rewrite it either way, so the
    next record starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
    _rewrite(path, [line for line, _ in _parse(path)])


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace the file's content by these lines atomically (:func:`~vlmkit.core.checkpoint.write_text_atomic`)."""
    write_text_atomic(path, "".join(lines))


__all__ = [
    "RunLog",
    "read_metrics",
    "loss_curve_data",
    "loss_figure",
    "stage_boundaries",
    "METRICS_FILE",
    "PLOT_FILE",
    "TENSORBOARD_DIR",
]
