"""The README's screenshot of `recipes serve` on a trained demo model: serves RUN (a run folder or
an export) on 127.0.0.1, opens the web chat in headless Chromium (Debian's `chromium`, through
Playwright), uploads a held-out demo scene, adds one in-context example from the training scenes,
asks the scene's "Where are ...?" question, and saves the window to OUT.png; prints the question,
the reference and the answer.

    python benchmarks/serve_screenshot.py runs/otter_mimicit docs/serve/demo.png
"""
import base64
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # RunningServer, the tests' server fixture
from serve_support import RunningServer
from vlmkit.demo.data import demo_data_dir
from vlmkit.serve.limits import Limits
from vlmkit.serve.server import build_server, load_worker
from playwright.sync_api import sync_playwright

run, out = Path(sys.argv[1]), Path(sys.argv[2])
d = demo_data_dir()
images = pd.read_parquet(d / "DEMO.parquet")
def png(image_id, path):
    local = d / "images" / f"{image_id}.png"
    if local.exists():
        shutil.copyfile(local, path); return path
    raw = images.loc[image_id, "base64"]
    path.write_bytes(base64.b64decode(raw + "=" * (-len(raw) % 4))); return path
ev = json.loads((d / "DEMO_EVAL_instructions.json").read_text())["data"]
tr = json.loads((d / "DEMO_instructions.json").read_text())["data"] if (d / "DEMO_instructions.json").exists() else None
tmp = Path(tempfile.mkdtemp())
q = ev["DEMO_EVAL_INS_00003"]
query = png(q["image_ids"][0], tmp / "scene.png")
ex_key = next(k for k, v in tr.items() if v["instruction"].startswith("Where are")) if tr else None
ex = tr[ex_key]
example = png(ex["image_ids"][0], tmp / "example.png")
worker, export = load_worker(run, limits=Limits())
with RunningServer(build_server(worker, export)) as server, sync_playwright() as p:
    browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(300_000)
    page.goto(server.url + "/", wait_until="load")
    page.locator("#model_card").wait_for()
    page.locator("#images input[type=file]").set_input_files(str(query))
    page.locator("#ex_image input[type=file]").set_input_files(str(example))
    page.locator("#ex_image img").first.wait_for()
    page.locator("#ex_question textarea").fill(ex["instruction"])
    page.locator("#ex_answer textarea").fill(ex["answer"])
    page.locator("#add_example").click()
    page.locator("#examples_list").get_by_text(ex["instruction"]).wait_for()
    page.locator("#images a[download='scene.png']").wait_for()
    page.locator("#question textarea").fill(q["instruction"])
    page.locator("#send").click()
    page.locator("#chat [data-testid='user']").get_by_text(q["instruction"]).wait_for()
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length > 0 && "
                           "!document.querySelector('#chat .generating, #chat .pending')")
    page.wait_for_timeout(1500)
    answer = page.locator("#chat [data-testid='bot']").last.inner_text()
    page.screenshot(path=str(out), full_page=False)
    browser.close()
print(json.dumps({"question": q["instruction"], "reference": q["answer"], "answer": answer,
                  "example": [ex["instruction"], ex["answer"]]}))
