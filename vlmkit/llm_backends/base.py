"""The LLM-backend interface: chat prompts in, completions out, in any order, as they finish.

A backend is registered through the ``register_llm_backends`` hook like any vlmkit component: a class
with a pydantic ``Config`` (unknown keys are errors). The data-generation pipeline
(:mod:`vlmkit.syphus`) owns caching, progress and retries of bad answers; a backend only turns
prompts into text, and says (:meth:`LLMBackend.identity`) everything that changes its answers, which
becomes part of every cache key."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = ["LLMBackend", "LLMBackendConfig", "Completion", "Message"]

#: one chat message: ``{"role": "system" | "user" | "assistant", "content": str}``
Message = dict[str, str]


class LLMBackendConfig(BaseModel):
    """Base of every backend config: unknown keys are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


@dataclass(frozen=True)
class Completion:
    """One answer: its text and the tokens it cost (as the backend counted them)."""

    text: str
    prompt_tokens: int
    completion_tokens: int


class LLMBackend(ABC):
    """Chat prompts -> completions."""

    kind: ClassVar[str] = "llm_backend"
    Config: ClassVar[type[LLMBackendConfig]] = LLMBackendConfig
    #: (input, output) price in currency units per 1000 tokens, for the progress bar's cost estimate
    price_per_1k: tuple[float, float] | None = None

    def __init__(self, config: LLMBackendConfig):
        self.config = config

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that changes the answers (model, sampling settings): part of every cache key."""

    @abstractmethod
    def complete(self, prompts: list[list[Message]]) -> Iterator[tuple[int, Completion]]:
        """Answer every prompt; yield ``(index into prompts, completion)`` as each one finishes (any
        order), so that the caller can store each answer at once. A prompt the backend gives up on
        raises :class:`vlmkit.core.errors.VlmkitError` naming the server's last answer."""

    def close(self) -> None:
        """Release connections or memory (default: nothing)."""
