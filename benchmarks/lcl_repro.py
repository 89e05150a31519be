"""The small-scale reproduction of link-context learning (README, "Link-context learning").

Trains the same starting model twice with the shipped recipes (their ``demo`` profile by default):
``lcl_repro`` on LCL episodes of the synthetic concepts ([2-way] at 16 shots, then 2..16) and ``lcl_repro_icl`` on
Otter-style in-context instructions, each followed by its ``lcl``, ``lcl_false_ratio`` and
``lcl_position`` evaluations on held-out invented concepts. Then it writes, under ``--out``
(default ``docs/lcl``): one PNG per evaluation with both models' curves, ``results.md`` (the
tables and how each target of the LCL paper's findings fared) and ``results.json``.

    python benchmarks/lcl_repro.py                 # both runs (at most an hour on 2 CPU cores)
    python benchmarks/lcl_repro.py --skip-train    # only redraw from runs/lcl_repro*/eval/after
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vlmkit.core.evaluation.runner import comparison_plot, read_result, table

RUNS = {"LCL ([2-way-random])": "lcl_repro", "ICL only": "lcl_repro_icl"}
EVALS = ("lcl", "lcl_false_ratio", "lcl_position")


def train(recipe: str, folder: Path, profile: str | None) -> float:
    cmd = [sys.executable, "-m", "vlmkit.core.cli", "run", recipe, "--output-dir", str(folder)]
    if profile:
        cmd += ["--profile", profile]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def targets(lcl: dict, icl: dict, false_ratio: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's three findings."""
    shots = [k for k in lcl["curves"]["string match"]]
    margins = {k: lcl["curves"]["string match"][k] - icl["curves"]["string match"][k] for k in shots}
    worst = min(margins, key=margins.get)
    at8 = lcl["curves"]["string match"].get("8")
    all_false = false_ratio["curves"]["string match"].get("100")
    out = [("LCL beats ICL-only by >= 0.2 at every shot count",
            f"smallest margin {margins[worst]:+.2f} (at {worst} shots)", margins[worst] >= 0.2)]
    if at8 is not None:
        out.append(("LCL reaches >= 0.9 at 8 shots", f"{at8:.2f}", at8 >= 0.9))
    if all_false is not None:
        out.append(("LCL falls to <= 0.1 with all support labels false", f"{all_false:.2f}", all_false <= 0.1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="where the two run folders go")
    parser.add_argument("--out", default="docs/lcl", help="where the plots and tables go")
    parser.add_argument("--profile", default=None, help="recipe profile (default: demo)")
    parser.add_argument("--skip-train", action="store_true", help="reuse the run folders' results")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "results.json"
    timings = json.loads(timings_file.read_text())["wall_seconds"] if args.skip_train and timings_file.exists() else {}
    if not args.skip_train:
        for label, recipe in RUNS.items():
            timings[label] = round(train(recipe, runs / recipe, args.profile), 1)
    results = {label: {name: read_result(runs / recipe / "eval" / "after" / f"{name}.json") for name in EVALS}
               for label, recipe in RUNS.items()}
    labels = list(RUNS)
    parts = ["# Link-context learning at small scale", ""]
    titles = {"lcl": "accuracy by shots, held-out concepts", "lcl_false_ratio": "false support labels (8 shots)",
              "lcl_position": "one support label changed (8 shots)"}
    for name in EVALS:
        pair = [results[label][name] for label in labels]
        comparison_plot(pair, labels, out / f"{name}.png", title=titles[name])
        parts += [f"![{name}]({name}.png)", "", table(pair, labels), ""]
    payload = {label: {name: {"metrics": r.metrics, "counts": r.counts, "curves": r.curves} for name, r in res.items()}
               for label, res in results.items()}
    found = targets(payload[labels[0]]["lcl"], payload[labels[1]]["lcl"], payload[labels[0]]["lcl_false_ratio"])
    parts += ["| target (the paper's finding) | measured | met |", "|---|---|---|"]
    parts += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in found]
    parts += ["", "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()), ""]
    (out / "results.md").write_text("\n".join(parts), encoding="utf-8")
    timings_file.write_text(json.dumps({"wall_seconds": timings, "results": payload,
                                        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in found]},
                                       indent=1) + "\n", encoding="utf-8")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
