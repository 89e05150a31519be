"""Shared by the serving tests: a smoke-profile otter_mimicit export and a server started in this
process on a free port."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

from PIL import Image


def smoke_export(folder: Path) -> Path:
    """A run folder holding ``export/`` of the otter_mimicit smoke model as built (seeded, not
    trained: its greedy answers are long enough to stream; the trained smoke model stops at once)."""
    from vlmkit.core.compose import build_model
    from vlmkit.core.export import export_model
    from vlmkit.core.recipe.loader import load_recipe
    from vlmkit.core.registry import get_registry

    registry = get_registry()
    resolved = load_recipe("otter_mimicit", "smoke", [], registry=registry)
    export_model(build_model(resolved, registry), resolved, folder / "export")
    return folder


def png_bytes(colour=(200, 30, 30), size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
