"""The serving pieces that need no model: guarded image decoding, the mapping of an OpenAI
conversation onto in-context examples and turns, the streamed-prefix rule, the model card's
choice of the last evaluation."""

from __future__ import annotations

import io
import os
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from serve_support import data_url, png_bytes
from vlmkit.serve.inputs import BadInput, image_from_bytes, image_from_data_url
from vlmkit.serve.limits import Limits


def test_images_are_checked_before_decoding():
    limits = Limits(max_image_bytes=4096, max_image_pixels=100 * 100)
    assert image_from_bytes(png_bytes(size=(50, 40)), "x", limits).size == (50, 40)
    with pytest.raises(BadInput, match="more than the limit of 10000 pixels") as big:
        image_from_bytes(png_bytes(size=(101, 100)), "messages[0]", limits)
    assert big.value.status == 413 and str(big.value).startswith("messages[0]")
    with pytest.raises(BadInput, match="bytes, more than the limit of 4096") as large:
        image_from_bytes(b"\x89PNG" + bytes(5000), "x", limits)
    assert large.value.status == 413
    with pytest.raises(BadInput, match="not a readable image"):
        image_from_bytes(b"GIF8 but not really", "x", limits)
    buffer = io.BytesIO()
    Image.new("RGB", (30, 30)).save(buffer, format="PNG")
    with pytest.raises(BadInput, match="not a readable image"):  # truncated: the header reads, the pixels do not
        image_from_bytes(buffer.getvalue()[:-30], "x", limits)


def test_data_urls_only():
    limits = Limits()
    assert image_from_data_url(data_url(png_bytes()), "u", limits).size == (40, 40)
    with pytest.raises(BadInput, match="only data URLs"):
        image_from_data_url("https://example.com/a.png", "u", limits)
    with pytest.raises(BadInput, match="base64"):
        image_from_data_url("data:image/png,rawtext", "u", limits)


def _worker(**limits):
    return SimpleNamespace(limits=Limits(**limits))


def _request(messages):
    from vlmkit.serve.openai_api import ChatRequest

    return ChatRequest.model_validate({"model": "m", "messages": messages})


def _user(text, image=False):
    parts = [{"type": "text", "text": text}]
    if image:
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_url(png_bytes())}})
    return {"role": "user", "content": parts}


def test_conversation_maps_examples_history_and_question():
    from vlmkit.serve.openai_api import conversation

    images, examples, history, question = conversation(_request([
        _user("q1", True), {"role": "assistant", "content": "a1"},
        _user("q2", True), {"role": "assistant", "content": "a2"},
        _user("q3", True), {"role": "assistant", "content": "a3"}, _user("q4")]), _worker())
    assert [(q, a) for _, q, a in examples] == [("q1", "a1"), ("q2", "a2")]
    assert len(images) == 1 and history == [("q3", "a3")] and question == "q4"


@pytest.mark.parametrize("messages, words", [
    ([_user("q")], "no image"),
    ([_user("q1"), {"role": "assistant", "content": "a"}, _user("q2", True)], "has no image but a later"),
    ([_user("q1", True), _user("q2", True)], "an in-context example is one user message"),
    ([_user("q1", True), {"role": "assistant", "content": "a"}], "last message must be the user's"),
    ([{"role": "system", "content": "s"}, _user("q", True)], "system messages"),
    ([_user("x" * 5000, True)], "longer than the limit"),
])
def test_conversation_errors(messages, words):
    from vlmkit.serve.openai_api import conversation

    with pytest.raises(BadInput, match=words):
        conversation(_request(messages), _worker())


def test_image_count_limit():
    from vlmkit.serve.openai_api import conversation

    message = _user("q", True)
    message["content"] = message["content"][:1] * 3 + message["content"][1:]
    with pytest.raises(BadInput, match="more than 2 images"):
        conversation(_request([message]), _worker(max_images=2))


def test_held_back_keeps_a_prefix_of_the_final_text():
    from vlmkit.serve.worker import _held_back

    specials = ["<|endofchunk|>", "<answer>"]
    assert _held_back("red <|endof", specials) == "red "
    assert _held_back("red <", specials) == "red "
    assert _held_back("red", specials) == "red"
    assert _held_back("caf\ufffd", specials) == "caf"  # an incomplete character at the end
    assert _held_back("\ufffd\ufffdx", specials) == "\ufffd\ufffdx"


def test_card_shows_the_newest_evaluation(tmp_path):
    from vlmkit.serve.card import last_evaluation

    assert last_evaluation(tmp_path) is None
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.md").write_text("| old | table |\n", encoding="utf-8")
    label = tmp_path / "eval" / "mine"
    label.mkdir()
    (label / "instructions.md").write_text("| new | table |\n", encoding="utf-8")
    past = time.time() - 100
    os.utime(tmp_path / "eval" / "summary.md", (past, past))
    where, text = last_evaluation(tmp_path)
    assert where == str(label) and "new" in text and "old" not in text
    os.utime(label / "instructions.md", (past - 10, past - 10))
    where, text = last_evaluation(tmp_path)
    assert where.endswith("summary.md") and "old" in text
