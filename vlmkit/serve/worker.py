"""One model, one generation at a time, a bounded queue in front of it, answers streamed.

:meth:`ModelWorker.reserve` takes a place in the queue (or raises :class:`Busy` when
``max_queue`` requests already wait); :meth:`ModelWorker.stream` then waits for the model and
yields the answer piece by piece. The pieces always add up to the answer
:func:`vlmkit.core.evaluation.generation.generate` returns for the same prompt (the text after the
last token is what that function's ``clean_answer`` makes of the whole output).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from vlmkit.core.chat import Chat
from vlmkit.core.errors import VlmkitError
from vlmkit.core.evaluation.generation import clean_answer, stop_token_ids
from vlmkit.serve.limits import Limits


class Busy(VlmkitError):
    """The queue is full: the request is refused, not kept waiting."""


class Settings(BaseModel):
    """How to generate one answer."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, ge=1)
    sample: bool = False
    """False: greedy (or beam search); True: sampling with ``temperature`` and ``top_p``."""
    temperature: float = Field(1.0, gt=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    num_beams: int = Field(1, ge=1)
    seed: int | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for the model's ``generate`` beyond the prompt and the length."""
        if not self.sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


class _StopWhenSet(StoppingCriteria):
    """Ends generation as soon as ``event`` is set (the stop button, a closed connection)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives the new token ids from ``generate`` (its first call is the prompt: skipped) and
    hands them to the reading thread through ``events``."""

    def __init__(self, events: queue.Queue) -> None:
        self.events = events
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.events.put(value.reshape(-1).tolist())

    def end(self) -> None:  # the generating thread says when it is done (after the answer is set)
        pass


_DONE = object()


def _held_back(text: str, specials: list[str]) -> str:
    """``text`` without an end that may still grow into a special token or into a character (the
    decoder writes one U+FFFD for an incomplete UTF-8 sequence at the end), so that what is shown is
    always a prefix of the final answer."""
    text = text.removesuffix("\ufffd")
    for token in specials:
        for n in range(min(len(token) - 1, len(text)), 0, -1):
            if text.endswith(token[:n]):
                return text[:-n]
    return text


@dataclass
class Ticket:
    """A place in the queue; give it back with :meth:`ModelWorker.release` (``stream`` does)."""

    worker: "ModelWorker"
    released: bool = field(default=False)


class ModelWorker:
    """The served model with its template, its limits and its queue."""

    def __init__(self, model: Any, resolved: Any, template: Any, limits: Limits, name: str):
        self.model = model
        self.resolved = resolved
        self.template = template
        self.limits = limits
        self.name = name
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._admitted = 0  # waiting + running
        tokenizer = model.decoder.tokenizer
        self._specials = [t for t in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})) if t]

    # ------------------------------------------------------------------ queue
    def reserve(self) -> Ticket:
        """A place in the queue, or :class:`Busy` when one request runs and ``max_queue`` wait."""
        with self._count_lock:
            if self._admitted > self.limits.max_queue:
                raise Busy(f"the server is busy: one request is being answered and {self.limits.max_queue} are "
                           "waiting (the queue's limit); try again shortly")
            self._admitted += 1
        return Ticket(self)

    def release(self, ticket: Ticket) -> None:
        with self._count_lock:
            if not ticket.released:
                ticket.released = True
                self._admitted -= 1

    @property
    def admitted(self) -> int:
        return self._admitted

    # ------------------------------------------------------------------ answers
    def chat(self, images: list[Any], examples: list[tuple[Any, str, str]], history: list[tuple[str, str]],
             settings: Settings, video: list[Any] | None = None) -> Chat:
        """The :class:`Chat` (what ``recipes chat`` uses) for one request."""
        return Chat(self.model, self.template, images or None, list(examples), settings.max_new_tokens,
                    list(history), video=video, num_beams=settings.num_beams)

    def stream(self, ticket: Ticket, chat: Chat, question: str, settings: Settings,
               stop: threading.Event | None = None, info: dict[str, Any] | None = None) -> Iterator[str]:
        """Start answering ``question`` (the generating thread waits for the model); the iterator
        returned yields the answer to ``question`` in pieces (each as soon as its tokens are generated; beam
        search: the whole answer at the end). Setting ``stop`` (or closing this generator) ends the
        generation early. ``info`` gets ``prompt_tokens`` (of the prompt's text),
        ``completion_tokens`` and ``finish_reason`` (``length`` when the answer ran into
        ``max_new_tokens``, else ``stop``).

        The model is taken, and the ticket given back, by the generating thread, not by this
        generator: a reader that goes away without closing it cannot keep the model or its place in
        the queue longer than one generation of at most ``max_new_tokens``."""
        stop = stop or threading.Event()
        info = {} if info is None else info
        tokenizer = self.model.decoder.tokenizer
        try:
            prompt = chat.prompt(question)  # render errors (an empty question ...) before waiting
        except BaseException:
            self.release(ticket)
            raise
        info["prompt_tokens"] = len(tokenizer("".join(text for text, _ in prompt.segments))["input_ids"])
        events: queue.Queue = queue.Queue()
        options = settings.options()
        options["stopping_criteria"] = StoppingCriteriaList([_StopWhenSet(stop)])
        streaming = settings.num_beams == 1  # transformers streams no beam search
        if streaming:
            options["streamer"] = _TokenQueue(events)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with self._model_lock:
                    if stop.is_set():
                        result["answer"] = ""
                        return
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    result["answer"] = chat.ask(question, options=options)
            except BaseException as exc:  # handed to the reader
                result["error"] = exc
            finally:
                self.release(ticket)
                events.put(_DONE)

        threading.Thread(target=run, name="vlmkit-generate", daemon=True).start()
        return self._pieces(events, result, streaming, settings, stop, info)

    def _pieces(self, events: queue.Queue, result: dict[str, Any], streaming: bool, settings: Settings,
                stop: threading.Event, info: dict[str, Any]) -> Iterator[str]:
        tokenizer = self.model.decoder.tokenizer
        shown = ""
        ids: list[int] = []
        try:
            while True:
                new = events.get()
                if new is _DONE:
                    break
                ids += new
                text = _held_back(clean_answer(tokenizer.decode(ids, skip_special_tokens=False), tokenizer),
                                  self._specials).rstrip()
                if text.startswith(shown) and len(text) > len(shown):
                    yield text[len(shown):]
                    shown = text
        except GeneratorExit:  # the reader closed this: stop the model
            stop.set()
            raise
        if "error" in result:
            raise result["error"]
        answer = result["answer"]
        if not streaming:
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        info["completion_tokens"] = len(ids)
        stops = set(stop_token_ids(tokenizer, self.template))
        info["finish_reason"] = ("length" if streaming and len(ids) >= settings.max_new_tokens
                                 and not (ids and ids[-1] in stops) else "stop")
        if not answer.startswith(shown):
            raise RuntimeError(f"streamed text {shown!r} is not a prefix of the answer {answer!r}")
        if len(answer) > len(shown):
            yield answer[len(shown):]

    def answer(self, ticket: Ticket, chat: Chat, question: str, settings: Settings) -> str:
        """The whole answer (non-streaming)."""
        return "".join(self.stream(ticket, chat, question, settings))
