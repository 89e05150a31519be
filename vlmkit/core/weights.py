"""Reading weight files safely: safetensors, or PyTorch files with ``weights_only=True`` (never a
full unpickle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.core.errors import VlmkitError


def load_state_dict_file(path: Path, field: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict. ``field`` names
    the recipe field that pointed here, for the error message."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VlmkitError(f"{field}: weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in {".pth", ".pt", ".bin", ".ckpt"}:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable or unsafe file is the user's to replace
            raise VlmkitError(f"{field}: cannot read '{path}' as a weights-only state dict: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise VlmkitError(f"{field}: '{path}' does not hold a mapping of tensor names to tensors")
        return state
    raise VlmkitError(f"{field}: '{path}' has an unknown suffix; allowed: .safetensors, .pth, .pt, .bin, .ckpt")
