"""``/v1/chat/completions`` and ``/v1/models``, as OpenAI's API has them, for one vlmkit model.

A conversation maps onto :class:`vlmkit.core.chat.Chat` (what ``recipes chat`` renders):

- it is cut before every user message that carries images; every part but the last is an
  in-context example and must be one user message with one image and text, then one assistant
  answer (``recipes chat --example IMAGE QUESTION ANSWER``);
- the last part is the query: its first user message carries the query's images, the turns after
  it are the conversation so far, and it ends with the user's question.

Images are ``image_url`` content parts holding base64 data URLs (no URL is fetched).
``temperature`` 0 or absent: greedy decoding (deterministic); above 0: sampling. ``num_beams`` is a
vlmkit extension (beam search; the answer then comes in one piece). Every other field OpenAI
defines and this server does not implement, and any unknown field, is refused with HTTP 400.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmkit.core.errors import VlmkitError
from vlmkit.serve.inputs import BadInput, image_from_data_url
from vlmkit.serve.worker import Busy, ModelWorker, Settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: Literal[1] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_beams: int | None = Field(None, ge=1)
    """vlmkit's extension: beam search with this many beams (greedy only)."""


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field (this server implements model, messages, max_tokens, "
                         "max_completion_tokens, temperature, top_p, n=1, seed, stream, stream_options, num_beams)")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def _text_and_images(message: Message, index: int, worker: ModelWorker) -> tuple[str, list[Any]]:
    if isinstance(message.content, str):
        return message.content, []
    texts, images = [], []
    for j, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            where = f"messages[{index}].content[{j}].image_url"
            if message.role != "user":
                raise BadInput(f"{where}: only user messages may carry images")
            images.append(image_from_data_url(part.image_url.url, where, worker.limits))
    return "\n".join(t for t in texts if t.strip()), images


def conversation(request: ChatRequest, worker: ModelWorker) -> tuple[list[Any], list[tuple[Any, str, str]], list[tuple[str, str]], str]:
    """(query images, in-context examples, conversation so far, question) of a request."""
    limits = worker.limits
    total_chars = 0
    images_seen = 0
    parsed: list[tuple[str, str, list[Any]]] = []
    for i, message in enumerate(request.messages):
        if message.role == "system":
            raise BadInput(f"messages[{i}]: system messages are not supported: the recipe's template has no system "
                           "prompt; put instructions in the user message")
        if isinstance(message.content, list):
            count = sum(isinstance(p, ImagePart) for p in message.content)
            if images_seen + count > limits.max_images:
                raise BadInput(f"messages[{i}]: more than {limits.max_images} images in the request (the limit)")
            images_seen += count
        text, images = _text_and_images(message, i, worker)
        total_chars += len(text)
        if total_chars > limits.max_text_chars:
            raise BadInput(f"messages[{i}]: the request's text is longer than the limit of {limits.max_text_chars} "
                           "characters", 413)
        parsed.append((message.role, text, images))
    if parsed[-1][0] != "user":
        raise BadInput(f"messages[{len(parsed) - 1}]: the last message must be the user's question")
    starts = [i for i, (role, _, imgs) in enumerate(parsed) if role == "user" and imgs] or [0]
    if starts[0] != 0:
        raise BadInput(f"messages[0]: has no image but a later user message does; an in-context example needs its "
                       "image, and the query's images come with its first message")
    examples: list[tuple[Any, str, str]] = []
    for a, b in zip(starts, starts[1:]):
        part = parsed[a:b]
        roles = [role for role, _, _ in part]
        if roles != ["user", "assistant"] or len(part[0][2]) != 1 or not part[0][1].strip():
            raise BadInput(f"messages[{a}:{b}]: an in-context example is one user message with one image and a "
                           f"question, then one assistant answer; got roles {roles} with {len(part[0][2])} image(s)")
        examples.append((part[0][2][0], part[0][1], part[1][1]))
    query = parsed[starts[-1]:]
    for k, (role, _, _) in enumerate(query):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise BadInput(f"messages[{starts[-1] + k}]: expected a {expected} message here (turns alternate, "
                           "starting with the user)")
    history = [(query[k][1], query[k + 1][1]) for k in range(0, len(query) - 1, 2)]
    images = query[0][2]
    if limits.require_image and not images:
        raise BadInput("messages: no image; this model answers questions about images: add an image_url content "
                       "part (a base64 data URL) to the first user message")
    question = query[-1][1]
    if not question.strip():
        raise BadInput(f"messages[{len(parsed) - 1}]: the question is empty")
    return images, examples, history, question


def settings_of(request: ChatRequest, worker: ModelWorker) -> Settings:
    limits = worker.limits
    max_new = request.max_completion_tokens or request.max_tokens or min(64, limits.max_new_tokens)
    if max_new > limits.max_new_tokens:
        raise BadInput(f"max_tokens: {max_new} is more than this server's limit of {limits.max_new_tokens}")
    beams = request.num_beams or 1
    if beams > limits.max_beams:
        raise BadInput(f"num_beams: {beams} is more than this server's limit of {limits.max_beams}")
    sample = bool(request.temperature)
    if sample and beams > 1:
        raise BadInput("num_beams: beam search is greedy; use temperature 0 (or leave it out) with num_beams")
    return Settings(max_new_tokens=max_new, sample=sample, temperature=request.temperature or 1.0,
                    top_p=request.top_p or 1.0, num_beams=beams, seed=request.seed)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or ``None`` when it is longer than ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def router(worker: ModelWorker) -> APIRouter:
    api = APIRouter()
    limits = worker.limits
    body_limit = limits.max_images * (limits.max_image_bytes * 4 // 3 + 1024) + 8 * limits.max_text_chars + 65536

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": worker.name, "object": "model", "created": 0, "owned_by": "vlmkit"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        raw = await _read_body(request, body_limit)
        if raw is None:
            return _error(413, f"the request body is larger than this server's limit of {body_limit} bytes "
                               f"({limits.max_images} images of at most {limits.max_image_bytes} bytes each)")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            return _error(400, _validation_message(exc))
        if req.model != worker.name:
            return _error(404, f"model '{req.model}' is not served here; this server serves '{worker.name}'",
                          param="model", kind="not_found_error")
        try:
            settings = settings_of(req, worker)
            images, examples, history, question = await anyio.to_thread.run_sync(conversation, req, worker)
            chat = worker.chat(images, examples, history, settings)
            chat.prompt(question)  # the template's own checks, before the request waits in the queue
        except BadInput as exc:
            return _error(exc.status, str(exc))
        except VlmkitError as exc:
            return _error(400, str(exc))
        try:
            ticket = worker.reserve()
        except Busy as exc:
            return _error(503, str(exc), kind="server_busy", headers={"Retry-After": "1"})
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        info: dict[str, Any] = {}
        pieces = worker.stream(ticket, chat, question, settings, info=info)
        if not req.stream:
            try:
                answer = "".join(await _collect(pieces))
            except VlmkitError as exc:
                return _error(400, str(exc))
            return {"id": ident, "object": "chat.completion", "created": created, "model": worker.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": info.get("finish_reason", "stop"), "logprobs": None}],
                    "usage": _usage(info)}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": worker.name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in _pieces(pieces):
                    yield chunk({"content": piece})
            except VlmkitError as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
                return
            yield chunk({}, info.get("finish_reason", "stop"))
            if req.stream_options is not None and req.stream_options.include_usage:
                payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": worker.name,
                           "choices": [], "usage": _usage(info)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return api


def _usage(info: dict[str, Any]) -> dict[str, int]:
    prompt, completion = info.get("prompt_tokens", 0), info.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_END = object()


async def _pieces(pieces: Any) -> AsyncIterator[str]:
    """The worker's (blocking) pieces, each fetched in a worker thread. Whatever ends the reading
    (a closed connection included) closes the generator, which stops the model and frees the queue."""
    try:
        while True:
            piece = await anyio.to_thread.run_sync(next, pieces, _END)
            if piece is _END:
                return
            yield piece
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(pieces.close)


async def _collect(pieces: Any) -> list[str]:
    return [piece async for piece in _pieces(pieces)]
