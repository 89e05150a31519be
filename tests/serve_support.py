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
    trained: its greedy answers are long enough to stream; the trained smoke model stops at once),
    with its output layer made to write legible text (:func:`legible_output`)."""
    from vlmkit.core.compose import build_model
    from vlmkit.core.export import export_model
    from vlmkit.core.recipe.loader import load_recipe
    from vlmkit.core.registry import get_registry

    registry = get_registry()
    resolved = load_recipe("otter_mimicit", "smoke", [], registry=registry)
    model = build_model(resolved, registry)
    legible_output(model)
    export_model(model, resolved, folder / "export")
    return folder


def legible_output(model) -> None:
    """Zero the output-layer rows of every token but ASCII letters, space and the special tokens.

    The smoke decoder's tokenizer is byte-level: the random model's greedy choices are mostly bytes
    of 128 and above, which decode (alone, as they come) to U+FFFD, so every answer reads
    "\ufffd\ufffd..." whatever the prompt, and comparing answers as text proves little (the same
    length gives the same text). With these rows at zero their logits are 0 while the largest of
    the 52 letters' and the space's is almost surely above 0: the answers are letters (no markdown
    for the web chat to render differently), and a different prompt shows as a different answer.
    Only the output layer changes (the smoke decoder does not tie it to the input embeddings), and
    the exported model is what both the server and the reference load."""
    import string

    import torch

    tokenizer = model.decoder.tokenizer
    lm = next(m for m in model.decoder.modules() if hasattr(m, "get_output_embeddings"))
    head = lm.get_output_embeddings()
    assert head.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr(), "tied embeddings: untie first"
    keep = {i for c in string.ascii_letters + " " for i in tokenizer(c, add_special_tokens=False)["input_ids"]}
    keep |= set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_encoder", {}).values())
    with torch.no_grad():
        head.weight[[i for i in range(head.weight.shape[0]) if i not in keep]] = 0


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
