"""Resumable training state as safetensors + JSON (nothing is pickled).

A checkpoint folder ``<output>/checkpoints/step-<global step>`` holds:

- ``model.safetensors``: every parameter trained so far in the run (all stages up to this one), in
  the dtype it is stored in: trained parameters are fp32 master weights even where their component
  was loaded in bf16 / fp16 (:func:`vlmkit.core.tuning.upcast_trainable_to_fp32`), so a resume
  continues from the exact values; a checkpoint written with half-precision values loads too;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and the rest of its state;
- ``scheduler.json``, ``scaler.json`` (fp16 only);
- ``rng.safetensors`` + ``rng.json``: torch (CPU and CUDA), numpy and Python generators;
- ``trainer.json``: stage, step within it, global step, micro-batches consumed, whether the stage is
  complete, the losses so far; ``recipe.yaml``: the resolved recipe.

It is written to a temporary folder and renamed into place, so a kill at any moment leaves either
the complete checkpoint or none; older ones beyond ``keep_last`` are removed only afterwards.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmkit.core.checkpoint import atomic_dir
from vlmkit.core.errors import VlmkitError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    stage_index: int
    stage: str
    step: int  # optimizer steps done in this stage
    global_step: int  # optimizer steps done in the run
    consumed: int  # global micro-batches consumed in this stage
    stage_done: bool
    losses: dict[str, list[float]] = field(default_factory=dict)  # stage -> loss per step


# ------------------------------------------------------------------------------ optimizer
def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        entry = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                entry[key] = value
        plain["state"][str(pid)] = entry
    return tensors, plain


def optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(entry) for pid, entry in plain["state"].items()}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


# ------------------------------------------------------------------------------ RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = plain["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------------ folders
def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with '.' and never match)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


def save_training_state(
    output_dir: Path,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: Any,
    trainer: TrainerState,
    recipe_yaml: str,
    keep_last: int,
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    tuning_json: str | None = None,
) -> Path:
    """``rng``: the generator states to store (default: now); Ctrl-C passes those of the start of the
    interrupted step so a resumed run repeats it exactly. ``tuning_json``: the stages' tuning records
    (:func:`vlmkit.core.tuning.records_json`: what each stage made trainable, which names
    ``model.safetensors`` holds), written as ``tuning.json``."""
    target = Path(output_dir) / "checkpoints" / f"step-{trainer.global_step:08d}"
    if optimizer is not None:
        opt_tensors, opt_plain = optimizer_to_files(optimizer)
    else:  # sharded (FSDP / DeepSpeed): the moments live on every rank, not gathered here
        opt_tensors, opt_plain = {}, {"saved": False}
    rng_tensors, rng_plain = rng if rng is not None else capture_rng()
    try:
        with atomic_dir(target) as tmp:
            save_file(weights, str(tmp / "model.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            _write_json(tmp / "optimizer.json", opt_plain)
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
            if scaler is not None:
                _write_json(tmp / "scaler.json", scaler.state_dict())
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            _write_json(tmp / "rng.json", rng_plain)
            _write_json(tmp / "trainer.json", asdict(trainer))
            (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
            if tuning_json is not None:
                (tmp / "tuning.json").write_text(tuning_json, encoding="utf-8")
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only folder: the older checkpoints stay
        kept = checkpoint_dirs(output_dir)
        raise VlmkitError(
            f"cannot write the checkpoint {target}: {exc}. Free space there (or lower run.keep_last, raise "
            f"run.checkpoint_every); "
            + (f"the last complete checkpoint, {kept[-1]}, is kept and the same command resumes from it"
               if kept else "no earlier checkpoint exists")
        ) from None
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass
class LoadedState:
    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # None: not saved (sharded training)
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng_tensors: dict[str, torch.Tensor]
    rng_plain: dict[str, Any]
    trainer: TrainerState
    recipe_yaml: str


def load_training_state(path: Path) -> LoadedState:
    path = Path(path)
    try:
        trainer = TrainerState(**json.loads((path / "trainer.json").read_text(encoding="utf-8")))
        scaler_path = path / "scaler.json"
        return LoadedState(
            path=path,
            weights=load_file(str(path / "model.safetensors")),
            optimizer=_optimizer(path),
            scheduler=json.loads((path / "scheduler.json").read_text()),
            scaler=json.loads(scaler_path.read_text()) if scaler_path.exists() else None,
            rng_tensors=load_file(str(path / "rng.safetensors")),
            rng_plain=json.loads((path / "rng.json").read_text()),
            trainer=trainer,
            recipe_yaml=(path / "recipe.yaml").read_text(encoding="utf-8"),
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise VlmkitError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); move it away to resume from an older one") from None


def _optimizer(path: Path) -> dict[str, Any] | None:
    plain = json.loads((path / "optimizer.json").read_text())
    if plain.get("saved") is False:
        return None
    return optimizer_from_files(load_file(str(path / "optimizer.safetensors")), plain)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=_no_default) + "\n", encoding="utf-8")


def _no_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a JSON checkpoint file")
