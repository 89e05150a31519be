"""``recipes serve``'s OpenAI-compatible API, driven by the ``openai`` client against a server
running in this process: answers equal ``vlmkit.load(...)`` + ``recipes chat``'s, bad requests get
a 4xx with a clear message and the server keeps serving, a full queue answers "busy"."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from serve_support import RunningServer, data_url, png_bytes, smoke_export

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import vlmkit
    from vlmkit.serve.limits import Limits
    from vlmkit.serve.server import build_server, load_worker

    run = smoke_export(tmp_path_factory.mktemp("serve") / "run")
    worker, export = load_worker(run, limits=Limits(max_queue=4, max_image_bytes=2 * 2**20))
    reference = vlmkit.load(run / "export")
    with RunningServer(build_server(worker, export)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield server, client, worker, reference


def _reference_answer(reference, worker, image, question, max_new_tokens, examples=(), history=()):
    """What ``recipes chat`` answers: the same Chat on the model ``vlmkit.load`` returns."""
    from vlmkit.core.chat import Chat

    chat = Chat(reference, worker.template, image, list(examples), max_new_tokens, list(history))
    return chat.ask(question)


def _image_message(raw: bytes, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(raw)}},
                                        {"type": "text", "text": text}]}


def test_answers_equal_load_generate(served):
    from vlmkit.core.data.images import decode_image

    server, client, worker, reference = served
    red, blue = png_bytes((200, 30, 30)), png_bytes((20, 40, 220))
    question = "What colour is the square?"
    expected = _reference_answer(reference, worker, decode_image(red, "red"), question, 12)
    assert expected.strip() and "\ufffd" not in expected, f"a legible answer (else equality proves little): {expected!r}"
    reply = client.chat.completions.create(model=worker.name, messages=[_image_message(red, question)], max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model=worker.name, messages=[_image_message(red, question)],
                                                 max_tokens=12, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected
    assert len(pieces) > 1, "streamed in more than one piece"

    # in-context example (blue picture, its Q/A), then the query on red, then a follow-up turn
    example = (decode_image(blue, "blue"), "What colour is it?", "blue")
    history = [(question, "red")]
    expected_icl = _reference_answer(reference, worker, decode_image(red, "red"), "And the background?", 10,
                                     [example], history)
    messages = [_image_message(blue, "What colour is it?"), {"role": "assistant", "content": "blue"},
                _image_message(red, question), {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And the background?"}]
    reply = client.chat.completions.create(model=worker.name, messages=messages, max_tokens=10)
    assert reply.choices[0].message.content == expected_icl
    without_example = _reference_answer(reference, worker, decode_image(red, "red"), "And the background?", 10,
                                        history=history)
    assert expected_icl != without_example, "the in-context example reached the prompt and changed the answer"


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def _still_serving(server, client, worker) -> None:
    reply = client.chat.completions.create(model=worker.name, messages=[_image_message(png_bytes(), "Colour?")],
                                           max_tokens=2)
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("case", ["no image", "50 MB image", "not an image", "unknown field", "unknown part field",
                                  "bomb", "system", "wrong model"])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, case):
    import io

    from PIL import Image

    server, client, worker, _ = served
    body = {"model": worker.name, "messages": [_image_message(png_bytes(), "What colour?")], "max_tokens": 2}
    expect = {"no image": (400, "no image"), "50 MB image": (413, "limit"), "not an image": (400, "not a readable image"),
              "unknown field": (400, "frequency_penalty: unknown field"), "unknown part field": (400, "unknown field"),
              "bomb": (413, "pixels"), "system": (400, "system messages"), "wrong model": (404, "is not served here")}
    if case == "no image":
        body["messages"] = [{"role": "user", "content": "What colour?"}]
    elif case == "50 MB image":
        body["messages"] = [_image_message(b"\x89PNG" + bytes(50 * 2**20), "What colour?")]
    elif case == "not an image":
        body["messages"] = [_image_message(b"%PDF-1.4 this is not a picture", "What colour?")]
    elif case == "unknown field":
        body["frequency_penalty"] = 0.5
    elif case == "unknown part field":
        body["messages"][0]["content"][1]["colour"] = "red"
    elif case == "bomb":  # 20000 x 20000 pixels of one colour: a small file that decodes to 1.2 GB
        buffer = io.BytesIO()
        Image.new("1", (20000, 20000)).save(buffer, format="PNG")
        assert len(buffer.getvalue()) < 2 * 2**20
        body["messages"] = [_image_message(buffer.getvalue(), "What colour?")]
    elif case == "system":
        body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    elif case == "wrong model":
        body["model"] = "gpt-4o"
    response = _post(server, body)
    status, words = expect[case]
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    _still_serving(server, client, worker)


def test_openai_client_raises_on_bad_request(served):
    server, client, worker, _ = served
    with pytest.raises(openai.BadRequestError, match="no image"):
        client.chat.completions.create(model=worker.name, messages=[{"role": "user", "content": "hi"}])


def test_twenty_concurrent_requests_complete_or_get_busy(served):
    """20 at once against a queue of 4: each is answered (equal to the lone answer) or refused with
    503 "busy" at once; none hangs; the server is free afterwards."""
    server, client, worker, _ = served
    body = {"model": worker.name, "messages": [_image_message(png_bytes(), "What colour?")], "max_tokens": 8}
    alone = _post(server, body).json()["choices"][0]["message"]["content"]
    start = threading.Barrier(20)

    def one(i: int) -> tuple[int, str, float]:
        start.wait()
        t0 = time.monotonic()
        payload = dict(body, stream=bool(i % 2))
        response = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=120)
        if response.status_code == 200 and payload["stream"]:
            text = "".join(line for line in response.text.splitlines() if line.startswith("data: "))
            return 200, text, time.monotonic() - t0
        return response.status_code, response.text, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20), timeout=300))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1
    assert codes.count(200) <= worker.limits.max_queue + 1 + 4  # a slot frees while others still arrive
    for code, text, _ in results:
        if code == 503:
            assert "busy" in text
        elif '"object": "chat.completion.chunk"' not in text:
            import json

            assert json.loads(text)["choices"][0]["message"]["content"] == alone
    assert worker.admitted == 0
    _still_serving(server, client, worker)


def test_closed_stream_frees_the_model(served):
    """A client that goes away mid-stream stops its generation: the next request is answered."""
    server, client, worker, _ = served
    body = {"model": worker.name, "messages": [_image_message(png_bytes(), "What colour?")], "max_tokens": 200,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break
    deadline = time.monotonic() + 60
    while worker.admitted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.admitted == 0
    _still_serving(server, client, worker)


def test_the_recipes_serve_command_loads_the_export_and_hands_the_app_to_uvicorn(monkeypatch, tmp_path, capsys):
    """`recipes serve` end to end through the CLI (argument parsing, the registry, loading), with
    uvicorn.run captured instead of binding a port; a missing folder is a clear error."""
    import uvicorn
    from fastapi.testclient import TestClient

    from vlmkit.core.cli import main

    run = smoke_export(tmp_path / "run")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app, host=host, port=port))
    assert main(["serve", str(run), "--port", "8123"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)  # this machine only unless told otherwise
    models = TestClient(served["app"]).get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["otter_mimicit"]
    assert "http://127.0.0.1:8123/v1/chat/completions" in capsys.readouterr().out
    assert main(["serve", str(tmp_path / "missing")]) != 0
    assert "missing" in capsys.readouterr().err
