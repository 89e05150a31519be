"""One FastAPI app with the OpenAI-compatible API and the Gradio app mounted at ``/``; run by
uvicorn on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from vlmkit.core.chat import pick_template
from vlmkit.core.export import find_export, load_with_recipe
from vlmkit.serve.card import model_card
from vlmkit.serve.limits import Limits
from vlmkit.serve.openai_api import router
from vlmkit.serve.worker import ModelWorker


def video_frames(resolved: Any) -> int | None:
    """Frames per clip of the recipe's video data (a dataset whose config declares
    ``group: VIDEO_TEXT``), or ``None`` when its data has no video."""
    counts = [spec.config.num_frames for spec in resolved.datasets.values()
              if getattr(spec.config, "group", None) == "VIDEO_TEXT" and hasattr(spec.config, "num_frames")]
    return max(counts) if counts else None


def load_worker(path: str | Path, *, limits: Limits, device: str = "cpu", template: str | None = None,
                trust_remote_code: bool = False, registry: Any = None) -> tuple[ModelWorker, Path]:
    """The model of a run folder or export (as ``recipes chat`` loads it), ready to serve."""
    export = find_export(path)
    model, resolved = load_with_recipe(export, device=device, registry=registry, trust_remote_code=trust_remote_code)
    worker = ModelWorker(model, resolved, pick_template(model, resolved, template), limits, resolved.recipe.name)
    return worker, export


def build_server(worker: ModelWorker, export: Path) -> FastAPI:
    """The FastAPI app: ``/v1/...`` and the web app at ``/``."""
    import gradio as gr

    from vlmkit.serve.web import build_app

    api = FastAPI(title=f"vlmkit serve: {worker.name}", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    api.include_router(router(worker))
    blocks = build_app(worker, model_card(export, worker.resolved), video_frames(worker.resolved))
    blocks.queue(default_concurrency_limit=worker.limits.max_queue + 1, max_size=4 * (worker.limits.max_queue + 1))
    return gr.mount_gradio_app(api, blocks, path="", footer_links=[], max_file_size=worker.limits.max_image_bytes)
