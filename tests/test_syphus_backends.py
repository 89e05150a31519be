"""The LLM backends: openai_compatible against a real HTTP server on 127.0.0.1 (concurrency limit,
429 and 5xx retried with backoff, dropped connections retried, clear errors), transformers with a
tiny random model, and their registration as a plug-in kind."""

from __future__ import annotations

import time

import pytest

from syphus_stub import StubServer
from vlmkit.core.errors import VlmkitError
from vlmkit.core.registry import Registry
from vlmkit.llm_backends.base import LLMBackend
from vlmkit.llm_backends.openai_compatible import OpenAICompatibleBackend, OpenAICompatibleConfig
from vlmkit.syphus.cli import build_backend


def echo(messages):
    return "echo: " + messages[-1]["content"]


def prompts(n):
    return [[{"role": "user", "content": f"prompt {i}"}] for i in range(n)]


def backend(url, **kw):
    return OpenAICompatibleBackend(OpenAICompatibleConfig(base_url=url, model="stub", **kw))


def test_backends_are_a_registered_plugin_kind_with_strict_configs():
    reg = Registry(entry_points=False)
    assert reg.names("llm_backend") == ["openai_compatible", "transformers"]
    for name in reg.names("llm_backend"):
        assert issubclass(reg.component_class("llm_backend", name), LLMBackend)
    with pytest.raises(VlmkitError, match="backend openai_compatible: .*api_key"):
        build_backend("openai_compatible", {"base_url": "http://x", "model": "m", "api_key": "sk-in-a-file"}, reg)
    with pytest.raises(VlmkitError, match="unknown llm_backend 'transformer'; did you mean 'transformers'"):
        build_backend("transformer", {}, reg)


def test_every_answer_comes_back_under_its_index_and_the_concurrency_limit_holds():
    with StubServer(echo, delay=0.15) as stub:
        b = backend(stub.url, concurrency=3)
        got = dict(b.complete(prompts(10)))
    assert {i: c.text for i, c in got.items()} == {i: f"echo: prompt {i}" for i in range(10)}
    assert got[4].completion_tokens == 3 and got[4].prompt_tokens == 10   # the server's usage
    assert stub.max_in_flight == 3          # reached, never passed
    assert stub.received == 10


def test_429_and_500_are_retried_with_doubling_backoff():
    with StubServer(echo, faults=["429", "500", "429"]) as stub:
        b = backend(stub.url, concurrency=1, backoff_s=0.05)
        slept = []
        b._sleep = lambda s: (slept.append(s), time.sleep(s))
        got = dict(b.complete(prompts(2)))
    assert got[0].text == "echo: prompt 0" and got[1].text == "echo: prompt 1"
    assert slept == [0.05, 0.1, 0.2]        # attempt 0, 1, 2 of the first prompt
    assert stub.received == 5 and stub.answered == 2 and b.retries == 3
    gaps = [b - a for a, b in zip(stub.arrivals, stub.arrivals[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2


def test_a_dropped_connection_is_retried():
    with StubServer(echo, faults=["ok", "drop", "drop"]) as stub:
        b = backend(stub.url, concurrency=1, backoff_s=0.01)
        got = dict(b.complete(prompts(2)))
    assert got[1].text == "echo: prompt 1"
    assert stub.received == 4 and b.retries == 2


def test_giving_up_names_the_server_and_its_last_answer():
    with StubServer(echo, faults=["429"] * 10) as stub:
        b = backend(stub.url, concurrency=1, backoff_s=0.0, max_retries=2)
        with pytest.raises(VlmkitError, match=r"failed 3 times; last: HTTP 429"):
            list(b.complete(prompts(1)))
    assert stub.received == 3


def test_a_400_is_not_retried_and_a_timeout_is():
    with StubServer(echo, delay=0.5) as stub:
        b = backend(stub.url, concurrency=1, timeout_s=0.1, max_retries=1, backoff_s=0.0)
        with pytest.raises(VlmkitError, match="ReadTimeout"):
            list(b.complete(prompts(1)))
    assert stub.received == 2


def test_the_key_comes_from_the_named_environment_variable(monkeypatch):
    seen = []
    with StubServer(echo) as stub:
        original = stub.server.RequestHandlerClass.do_POST

        def spy(self):
            seen.append(self.headers.get("Authorization"))
            return original(self)

        stub.server.RequestHandlerClass.do_POST = spy
        monkeypatch.setenv("STUB_KEY", "secret-123")
        dict(backend(stub.url, api_key_env="STUB_KEY").complete(prompts(1)))
    assert seen == ["Bearer secret-123"]
    monkeypatch.delenv("STUB_KEY")
    with pytest.raises(VlmkitError, match="'STUB_KEY', but that environment variable is not set"):
        backend("http://127.0.0.1:1/v1", api_key_env="STUB_KEY")


TINY = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512},
        "tokenizer_type": "byte_level", "prompt_format": "plain", "max_new_tokens": 6}


def test_transformers_backend_batches_and_matches_one_by_one_generation():
    import torch

    torch.manual_seed(0)
    b = build_backend("transformers", {**TINY, "batch_size": 3})
    ps = [[{"role": "system", "content": "s"}, {"role": "user", "content": "x" * n}] for n in (1, 7, 3, 12)]
    batched = dict(b.complete(ps))
    assert sorted(batched) == [0, 1, 2, 3]
    b.config = b.config.model_copy(update={"batch_size": 1})
    single = dict(b.complete(ps))
    assert [batched[i].text for i in range(4)] == [single[i].text for i in range(4)]  # left padding changes nothing
    assert all(c.completion_tokens <= 6 for c in batched.values())
    assert b.render(ps[0]) == "System: s\n\nUser: x\n\nAssistant:"
    assert b.identity()["max_new_tokens"] == 6


def test_transformers_backend_refuses_a_missing_chat_template():
    with pytest.raises(VlmkitError, match="has no chat template; set prompt_format: plain"):
        build_backend("transformers", {**TINY, "prompt_format": "chat_template"})
