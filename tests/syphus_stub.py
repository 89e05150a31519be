"""An OpenAI-compatible chat-completions server for tests, on 127.0.0.1 (a real HTTP server in a
thread): scripted answers, scripted faults (429, 500, a dropped connection, a hang), and counts of
what it received and answered, per prompt."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class StubServer:
    def __init__(self, answer: Callable[[list[dict]], str], faults: list[str] = (), delay: float = 0.0,
                 hang_after: int | None = None):
        """``answer(messages) -> text``; ``faults[n]`` is what the n-th request gets ("429", "500",
        "drop", anything else: an answer); ``delay``: seconds each request is held before its answer
        (to see concurrency); ``hang_after``: requests after this many answers are never answered."""
        self.answer, self.faults, self.delay, self.hang_after = answer, list(faults), delay, hang_after
        self.lock = threading.Lock()
        self.received = 0
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered_prompts: Counter[str] = Counter()
        self.arrivals: list[float] = []
        self.hanging = threading.Event()
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    n = stub.received
                    stub.received += 1
                    stub.arrivals.append(time.monotonic())
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    fault = stub.faults[n] if n < len(stub.faults) else "ok"
                    hang = stub.hang_after is not None and stub.answered >= stub.hang_after
                try:
                    if stub.delay:
                        time.sleep(stub.delay)
                    if hang:
                        stub.hanging.set()
                        stub.release.wait(60)
                        self._drop()
                        return
                    if fault == "drop":
                        self._drop()
                        return
                    if fault in ("429", "500"):
                        data = b'{"error": "scripted"}'
                        self.send_response(int(fault))
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        if fault == "429":
                            self.send_header("Retry-After", "0")
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    text = stub.answer(body["messages"])
                    key = json.dumps(body["messages"], sort_keys=True)
                    with stub.lock:
                        stub.answered += 1
                        stub.answered_prompts[key] += 1
                    data = json.dumps({"id": f"stub-{n}", "object": "chat.completion", "model": body["model"],
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": text}}],
                                       "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split())}}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
