"""The training engine: stages, exact resume, the run log and the export.

``run(resolved, output_dir)`` is the entry point (:mod:`vlmkit.core.engine.trainer`)."""

from vlmkit.core.engine.trainer import RunInterrupted, RunResult, StageResult, run

__all__ = ["run", "RunResult", "StageResult", "RunInterrupted"]
