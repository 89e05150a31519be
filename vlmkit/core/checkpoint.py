"""Writing checkpoints atomically: everything goes into a temporary folder beside the target, which
is renamed into place only when complete. Weights are safetensors, metadata JSON/YAML."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` (an old one is removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (contiguous CPU copies), keyed by their names in ``model``."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(target: Path, weights: dict[str, torch.Tensor], recipe_yaml: str, meta: dict[str, Any]) -> Path:
    with atomic_dir(target) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return target
