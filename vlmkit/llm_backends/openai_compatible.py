"""``openai_compatible``: any server speaking the OpenAI chat-completions API (OpenAI, vLLM, TGI,
llama.cpp's server, Ollama), through ``httpx``.

The API key is read from the environment variable the config names (``api_key_env``), never from a
file. At most ``concurrency`` requests are in flight at once. A request that gets 429 or a 5xx answer,
times out, or loses its connection is retried up to ``max_retries`` times after a backoff of
``backoff_s * 2**attempt`` seconds (or the server's ``Retry-After``, capped at ``max_backoff_s``).
Past one machine: point ``base_url`` at a served cluster (e.g. vLLM's OpenAI server behind a load
balancer) and raise ``concurrency``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from vlmkit.core.errors import VlmkitError
from vlmkit.llm_backends.base import Completion, LLMBackend, LLMBackendConfig, Message

__all__ = ["OpenAICompatibleBackend", "OpenAICompatibleConfig", "RETRY_STATUS"]

#: HTTP statuses that are retried (rate limit and server errors)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class OpenAICompatibleConfig(LLMBackendConfig):
    base_url: str = Field(pattern=r"^https?://")
    """The API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1`` (vLLM)."""
    model: str
    """The model name the server knows."""
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the API key (None: no key, e.g. a local server)."""
    concurrency: PositiveInt = 4
    """Requests in flight at once."""
    max_retries: NonNegativeInt = 5
    backoff_s: NonNegativeFloat = 1.0
    """First backoff; doubled on every retry."""
    max_backoff_s: NonNegativeFloat = 60.0
    timeout_s: PositiveFloat = 120.0
    """Per request (connect, read, write)."""
    max_tokens: PositiveInt = 512
    temperature: NonNegativeFloat = 0.0
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    price_per_1k_input: NonNegativeFloat | None = None
    """Currency units per 1000 prompt tokens, for the progress bar's cost estimate."""
    price_per_1k_output: NonNegativeFloat | None = None


class OpenAICompatibleBackend(LLMBackend):
    """Any OpenAI chat-completions server (OpenAI, vLLM, TGI, llama.cpp, Ollama); key from a named env variable."""

    Config = OpenAICompatibleConfig

    def __init__(self, config: OpenAICompatibleConfig):
        super().__init__(config)
        import httpx

        headers = {"Content-Type": "application/json"}
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise VlmkitError(f"backend openai_compatible: api_key_env names '{config.api_key_env}', "
                                  "but that environment variable is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
        self.client = httpx.Client(base_url=config.base_url.rstrip("/") + "/", headers=headers,
                                   timeout=httpx.Timeout(config.timeout_s), limits=limits)
        if config.price_per_1k_input is not None or config.price_per_1k_output is not None:
            self.price_per_1k = (config.price_per_1k_input or 0.0, config.price_per_1k_output or 0.0)
        self.retries = 0  # retried requests so far (all reasons)
        self._lock = threading.Lock()
        self._sleep = time.sleep

    def identity(self) -> dict[str, Any]:
        c = self.config
        return {"backend": "openai_compatible", "model": c.model, "max_tokens": c.max_tokens,
                "temperature": c.temperature, "top_p": c.top_p, "seed": c.seed}

    def _body(self, messages: list[Message]) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"model": c.model, "messages": messages, "max_tokens": c.max_tokens,
                                "temperature": c.temperature, "top_p": c.top_p}
        if c.seed is not None:
            body["seed"] = c.seed
        return body

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.config.backoff_s * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        with self._lock:
            self.retries += 1
        self._sleep(min(delay, self.config.max_backoff_s))

    def call(self, messages: list[Message]) -> Completion:
        """One chat completion, retried as the config says."""
        import httpx

        last = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            try:
                response = self.client.post("chat/completions", json=self._body(messages))
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._parse(response)
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    raise VlmkitError(f"backend openai_compatible: {self.config.base_url} answered {last}")
                retry_after = response.headers.get("retry-after")
            if attempt < self.config.max_retries:
                self._wait(attempt, retry_after)
        raise VlmkitError(f"backend openai_compatible: {self.config.base_url} failed "
                          f"{self.config.max_retries + 1} times; last: {last}")

    def _parse(self, response: Any) -> Completion:
        try:
            data = response.json()
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise VlmkitError(f"backend openai_compatible: {self.config.base_url} sent an answer that is not a "
                              f"chat completion ({type(exc).__name__}: {exc}): {response.text[:300]}") from None
        usage = data.get("usage") or {}
        return Completion(str(text or "").strip(), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))

    def complete(self, prompts: list[list[Message]]) -> Iterator[tuple[int, Completion]]:
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            pending: dict[Future, int] = {}
            queue = iter(enumerate(prompts))

            def submit() -> bool:
                nxt = next(queue, None)
                if nxt is None:
                    return False
                pending[pool.submit(self.call, nxt[1])] = nxt[0]
                return True

            for _ in range(self.config.concurrency):
                if not submit():
                    break
            try:
                while pending:
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for future in done:
                        index = pending.pop(future)
                        yield index, future.result()
                        submit()
            finally:
                for future in pending:
                    future.cancel()

    def close(self) -> None:
        self.client.close()
