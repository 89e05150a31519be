"""``recipes serve``'s web app in a real browser: headless Chromium (Debian's ``chromium``, driven
by Playwright through its executable) opens the app of a smoke-profile export, uploads an image,
adds an in-context example, asks, and sees the answer stream in; the answer equals ``recipes
chat``'s for the same input. A screenshot is kept under the test's tmp folder and copied to
tests/artefacts/serve_browser.png (ignored by git).

Run with ``make test-browser`` (marker ``browser``; the default suite leaves it out)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve_support import RunningServer, png_bytes, smoke_export

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTEFACTS = Path(__file__).parent / "artefacts"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: install Debian's package (apt-get install -y chromium); .ci/run does")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[dev])")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


# the text of the last answer bubble, recorded at every change of the page (what the user sees)
_WATCH = """() => {
  window.__answers = [];
  const last = () => { const bots = document.querySelectorAll('#chat [data-testid="bot"]');
                       return bots.length ? bots[bots.length - 1].innerText : null; };
  new MutationObserver(() => { const t = last(); if (t !== null && t !== window.__answers.at(-1)) window.__answers.push(t); })
    .observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_web_chat_streams_an_answer_with_an_in_context_example(browser, tmp_path):
    from vlmkit.core.chat import Chat
    from vlmkit.core.data.images import decode_image
    from vlmkit.serve.limits import Limits
    from vlmkit.serve.server import build_server, load_worker

    run = smoke_export(tmp_path / "run")
    query, example = tmp_path / "query.png", tmp_path / "example.png"
    query.write_bytes(png_bytes((200, 30, 30), (64, 64)))
    example.write_bytes(png_bytes((20, 40, 220), (64, 64)))
    worker, export = load_worker(run, limits=Limits())
    expected = Chat(worker.model, worker.template, decode_image(query.read_bytes(), "q"),
                    [(decode_image(example.read_bytes(), "e"), "What colour is it?", "blue")],
                    min(32, worker.limits.max_new_tokens)).ask("What colour is this?")  # the app's default length
    alone = Chat(worker.model, worker.template, decode_image(query.read_bytes(), "q"), [],
                 min(32, worker.limits.max_new_tokens)).ask("What colour is this?")
    assert expected != alone, "the in-context example changes the answer (else the page could have left it out)"
    with RunningServer(build_server(worker, export)) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(300_000)  # a loaded CI machine: the first page load alone can take a minute
        page.goto(server.url + "/", wait_until="load")
        page.locator("#model_card").wait_for()
        assert "otter_mimicit" in page.locator("#model_card").inner_text()
        page.locator("#images input[type=file]").set_input_files(str(query))
        page.locator("#ex_image input[type=file]").set_input_files(str(example))
        page.locator("#ex_image img").first.wait_for(timeout=300_000)
        page.locator("#ex_question textarea").fill("What colour is it?")
        page.locator("#ex_answer textarea").fill("blue")
        page.locator("#add_example").click()
        page.locator("#examples_list").get_by_text("What colour is it?").wait_for(timeout=300_000)
        # the file list shows the name split in spans (stem, extension); the download link appears once
        # the upload reached the server
        page.locator("#images a[download='query.png']").wait_for(timeout=300_000)
        page.evaluate(_WATCH)
        page.locator("#question textarea").fill("What colour is this?")
        page.locator("#send").click()
        page.locator("#chat [data-testid='user']").get_by_text("What colour is this?").wait_for(timeout=300_000)
        page.wait_for_function("() => window.__answers.length > 0", timeout=300_000)
        page.wait_for_function("(n) => document.querySelectorAll('#chat [data-testid=\"bot\"]').length > 0 && "
                               "!document.querySelector('#chat .generating, #chat .pending')", arg=None, timeout=300_000)
        page.wait_for_timeout(1000)
        seen = page.evaluate("() => window.__answers")
        shot = tmp_path / "serve_browser.png"
        page.screenshot(path=str(shot), full_page=True)
        ARTEFACTS.mkdir(exist_ok=True)
        shutil.copyfile(shot, ARTEFACTS / "serve_browser.png")
    final = " ".join(seen[-1].split())
    assert final == " ".join(expected.split()), (seen, expected)
    growing = [s for s in seen if s.strip()]
    assert len(growing) >= 2 and all(" ".join(b.split()).startswith(" ".join(a.split())) for a, b in zip(growing, growing[1:])), \
        f"the answer appeared in pieces, each extending the last: {growing}"
