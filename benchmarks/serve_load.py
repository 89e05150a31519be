"""Load on ``recipes serve``: N concurrent API requests (half streamed) against the otter_mimicit
smoke model, in this process; prints how many were answered and how many got "busy", the
latencies and the process's resident memory (before loading, after loading, peak during the load).

    python benchmarks/serve_load.py [--requests 20] [--max-queue 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's vlmkit and the tests' helpers
from serve_support import RunningServer, data_url, png_bytes, smoke_export  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    proc = psutil.Process()
    mib = lambda b: b / 2**20  # noqa: E731
    rss_start = proc.memory_info().rss
    from vlmkit.serve.limits import Limits
    from vlmkit.serve.server import build_server, load_worker

    with tempfile.TemporaryDirectory() as tmp:
        run = smoke_export(Path(tmp) / "run")
        worker, export = load_worker(run, limits=Limits(max_queue=args.max_queue))
        app = build_server(worker, export)
        rss_loaded = proc.memory_info().rss
        peak = [rss_loaded]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)

        body = {"model": worker.name, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                                                          {"type": "text", "text": "What colour is the square?"}]}]}
        with RunningServer(app) as server:
            barrier = threading.Barrier(args.requests)

            def one(i: int) -> tuple[int, float]:
                barrier.wait()
                t0 = time.monotonic()
                r = httpx.post(server.url + "/v1/chat/completions", json=dict(body, stream=bool(i % 2)), timeout=600)
                return r.status_code, time.monotonic() - t0

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.monotonic() - t0
            done.set()
    ok = sorted(t for c, t in results if c == 200)
    busy = sorted(t for c, t in results if c == 503)
    other = [c for c, _ in results if c not in (200, 503)]
    print(f"{args.requests} concurrent requests, queue {args.max_queue}, max_tokens {args.max_tokens}: "
          f"{len(ok)} answered (latency {ok[0]:.2f}-{ok[-1]:.2f} s), {len(busy)} busy (503 in "
          f"{max(busy, default=0):.3f} s at most), {len(other)} other {other}; all done in {wall:.1f} s")
    print(f"RSS: {mib(rss_start):.0f} MiB at start, {mib(rss_loaded):.0f} MiB with the model and app, "
          f"peak {mib(peak[0]):.0f} MiB during the load (+{mib(peak[0] - rss_loaded):.0f} MiB)")


if __name__ == "__main__":
    main()
