"""``recipes serve``: check the options, load the model, run the server."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from vlmkit.core.errors import VlmkitError
from vlmkit.serve.limits import Limits


def limits_of(args: argparse.Namespace) -> Limits:
    for option in ("max_queue", "max_images", "max_new_tokens"):
        value = getattr(args, option)
        if value < (0 if option == "max_queue" else 1):
            raise VlmkitError(f"--{option.replace('_', '-')}: must be at least {0 if option == 'max_queue' else 1}, "
                              f"got {value}")
    if not args.max_image_mb > 0:
        raise VlmkitError(f"--max-image-mb: must be above 0, got {args.max_image_mb}")
    if not 0 < args.port < 65536:
        raise VlmkitError(f"--port: must be between 1 and 65535, got {args.port}")
    try:
        return Limits(max_queue=args.max_queue, max_images=args.max_images, max_new_tokens=args.max_new_tokens,
                      max_image_bytes=int(args.max_image_mb * 2**20), require_image=not args.allow_no_image)
    except ValidationError as exc:
        raise VlmkitError(f"serve options: {exc}") from None


def serve(args: argparse.Namespace, registry: Any) -> int:
    import torch
    import uvicorn

    from vlmkit.serve.server import build_server, load_worker

    limits = limits_of(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    worker, export = load_worker(args.model, limits=limits, device=device, template=args.template,
                                 trust_remote_code=args.trust_remote_code, registry=registry)
    app = build_server(worker, export)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {worker.name} from {export} on http://{shown}:{args.port}/ "
          f"(web chat) and http://{shown}:{args.port}/v1/chat/completions (OpenAI API, model '{worker.name}')")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
