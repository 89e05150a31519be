"""accelerate configuration files for launching vlmkit on several processes.

``vlmkit.launch.path("ddp")`` is the file to give ``accelerate launch --config_file``:
``ddp`` (one machine, its GPUs, or gloo processes on the CPU), ``fsdp``, ``deepspeed_zero2``,
``deepspeed_zero3``. Set ``--num_processes`` on the command line to override the file's count.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlmkit.core.errors import VlmkitError, listing, suggest

CONFIGS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def path(name: str) -> Path:
    if name not in CONFIGS:
        raise VlmkitError(f"unknown launch config '{name}'{suggest(name, CONFIGS)} available: {listing(CONFIGS)}")
    return Path(str(resources.files("vlmkit.launch").joinpath(f"{name}.yaml")))
