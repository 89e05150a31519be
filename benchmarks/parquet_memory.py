"""Peak memory of reading every image of a MIMIC-IT image file, 1,000 vs 20,000 images.

Writes, for each size, a parquet file of 64x64 PNG images (base64 column indexed by image id,
row groups of 256 images), the same images as a legacy JSON map, and an instructions file with one
record per image; then reads every image in a fresh subprocess per case and takes the child's peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, cross-checked with ``VmHWM``):

- ``ParquetImages``: every image through the lazy parquet store;
- ``JsonImages``: every image through the lazy JSON store;
- ``MimicIT``: every record through the dataset (parquet images; two in-context examples each);
- ``eager``: for reference, what the lazy stores avoid: the whole table read into memory
  (``pyarrow.parquet.read_table(...).to_pydict()``, as ``pandas.read_parquet(...).to_dict()``),
  then every image decoded from it.

Target: the lazy cases' peak at 20k images within 1.2x of their peak at 1k. Results go to
``benchmarks/results/parquet_memory.{md,json}``.

    python benchmarks/parquet_memory.py            # 1k and 20k, about a minute
    python benchmarks/parquet_memory.py --sizes 1000 5000 --keep /tmp/pm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("parquet", "json", "mimicit", "eager")
LAZY = ("parquet", "json", "mimicit")
TARGET = 1.2
ROW_GROUP = 256


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------- generation
def generate(folder: Path, n: int) -> None:
    """``folder/XX.parquet``, ``XX.json`` and ``XX_instructions.json`` with ``n`` images."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from vlmkit.core.data.images import write_parquet_images

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    y, x = np.mgrid[0:64, 0:64]

    def images():
        for i in range(n):
            base = np.stack([(x * 4 + i) % 256, (y * 4 + i * 7) % 256, ((x + y) * 2 + i * 13) % 256], -1)
            pixels = ((base + rng.integers(0, 4, size=(64, 64, 3))) % 256).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(buffer, "PNG")
            yield f"BENCH_IMG_{i:06d}", base64.urlsafe_b64encode(buffer.getvalue()).decode("ascii")

    with open(folder / "XX.json", "w") as legacy:
        legacy.write("{")

        def both():
            for k, (image_id, value) in enumerate(images()):
                legacy.write(("," if k else "") + json.dumps(image_id) + ": " + json.dumps(value))
                yield image_id, value

        write_parquet_images(both(), folder / "XX.parquet", row_group_size=ROW_GROUP)
        legacy.write("}")
    data = {
        f"BENCH_INS_{i:06d}": {
            "instruction": f"What does picture {i} show?",
            "answer": f"A gradient with noise, number {i}.",
            "image_ids": [f"BENCH_IMG_{i:06d}"],
            "rel_ins_ids": [f"BENCH_INS_{j:06d}" for j in (i - 2, i - 1) if j >= 0],
        }
        for i in range(n)
    }
    (folder / "XX_instructions.json").write_text(json.dumps({"meta": {"benchmark": "parquet_memory"}, "data": data}))


# ------------------------------------------------------------------------------------------- child
def child(case: str, folder: Path) -> dict:
    """Read every image of ``folder`` the ``case`` way; report the peaks."""
    from vlmkit.core.data.images import JsonImages, ParquetImages, decode_image

    if case == "mimicit":
        from vlmkit.datasets.mimicit import MimicIT, MimicITConfig
    import pyarrow.parquet as pq

    baseline = peak_rss_mib()
    start = time.perf_counter()
    checksum = 0
    count = 0
    if case in ("parquet", "json"):
        store = ParquetImages(folder / "XX.parquet") if case == "parquet" else JsonImages(folder / "XX.json")
        for image_id in store.ids():
            checksum += store.get(image_id).getpixel((3, 5))[0]
            count += 1
    elif case == "mimicit":
        config = MimicITConfig(
            instructions=folder / "XX_instructions.json", images=folder / "XX.parquet", group="IMAGE_TEXT",
            context_mode="per_example", max_context=2,
        )
        dataset = MimicIT(config)
        for i in range(len(dataset)):
            record = dataset[i]
            for exchange in [*record.context, record.query]:
                for media in exchange.media:
                    checksum += media.frames[0].getpixel((3, 5))[0]
                    count += 1
        assert dataset.summary() == "", dataset.summary()
    elif case == "eager":
        table = pq.read_table(folder / "XX.parquet").to_pydict()
        index_column = next(name for name in table if name != "base64")
        images = dict(zip(table[index_column], table["base64"]))
        del table
        for image_id, value in images.items():
            checksum += decode_image(value, image_id).getpixel((3, 5))[0]
            count += 1
    else:
        raise SystemExit(f"unknown case {case}")
    return {
        "case": case,
        "images_read": count,
        "seconds": round(time.perf_counter() - start, 2),
        "baseline_mib": round(baseline, 1),
        "peak_mib": round(peak_rss_mib(), 1),
        "vm_hwm_mib": None if vm_hwm_mib() is None else round(vm_hwm_mib(), 1),
        "checksum": checksum,
    }


def run_child(case: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, str(folder)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"child {case} {folder} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report
def table(results: list[dict], sizes: list[int]) -> tuple[str, list[dict]]:
    small, large = min(sizes), max(sizes)
    by = {(r["case"], r["n"]): r for r in results}
    rows = []
    lines = [
        f"| case | images | peak RSS at {small:,} (MiB) | peak RSS at {large:,} (MiB) | ratio | growth over imports "
        f"{small:,} / {large:,} (MiB) | time at {large:,} (s) | target {TARGET}x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        a, b = by.get((case, small)), by.get((case, large))
        if not a or not b:
            continue
        ratio = b["peak_mib"] / a["peak_mib"]
        verdict = ("pass" if ratio <= TARGET else "FAIL") if case in LAZY else "(reference)"
        rows.append({"case": case, "small": a, "large": b, "ratio": round(ratio, 3), "verdict": verdict})
        lines.append(
            f"| {case} | {b['images_read']:,} | {a['peak_mib']:.1f} | {b['peak_mib']:.1f} | {ratio:.3f} | "
            f"{a['peak_mib'] - a['baseline_mib']:.1f} / {b['peak_mib'] - b['baseline_mib']:.1f} | {b['seconds']:.1f} | {verdict} |"
        )
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--keep", type=Path, help="write the data here and keep it (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=2, metavar=("FOLDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return 0
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return 0

    # this process stays small: generation and every measurement run in their own subprocesses
    # (a child's ru_maxrss starts from the RSS its parent had when it was started)
    root = args.keep or Path(tempfile.mkdtemp(prefix="parquet_memory_"))
    started = time.perf_counter()
    results = []
    try:
        for n in args.sizes:
            folder = root / f"n{n}"
            if not (folder / "XX_instructions.json").exists():
                t = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--generate", str(folder), str(n)], check=True)
                size = (folder / "XX.parquet").stat().st_size / (1 << 20)
                print(f"wrote {n:,} images ({size:.1f} MiB parquet) in {time.perf_counter() - t:.1f}s", flush=True)
            for case in args.cases:
                result = run_child(case, folder) | {"n": n}
                results.append(result)
                print(f"  {case:8s} n={n:>6,}  peak {result['peak_mib']:7.1f} MiB  (imports {result['baseline_mib']:.1f}, "
                      f"VmHWM {result['vm_hwm_mib']})  {result['seconds']:.1f}s", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    markdown, rows = table(results, args.sizes)
    header = (
        f"# Peak memory reading every image: {min(args.sizes):,} vs {max(args.sizes):,} images\n\n"
        f"64x64 PNG images, base64 in parquet (row groups of {ROW_GROUP}) and in a JSON map; each case in a fresh "
        "subprocess, peak RSS from `getrusage(RUSAGE_SELF).ru_maxrss` in the child. 'growth over imports' "
        "subtracts the peak after the imports. Target: 20k peak within "
        f"{TARGET}x of 1k peak for the lazy cases; `eager` (whole table in memory) is the reference.\n\n"
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs.\n\n"
    )
    text = header + markdown + "\n"
    print()
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parquet_memory.md").write_text(text)
    payload = {
        "sizes": args.sizes, "row_group_size": ROW_GROUP, "target_ratio": TARGET, "results": results,
        "ratios": {r["case"]: r["ratio"] for r in rows}, "verdicts": {r["case"]: r["verdict"] for r in rows},
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    (args.out / "parquet_memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out / 'parquet_memory.md'} and .json in {payload['seconds_total']}s")
    return 0 if all(r["verdict"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
