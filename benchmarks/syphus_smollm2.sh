#!/usr/bin/env bash
# The offline Syphus measurement (issue 16): the packaged SmolLM2-135M-Instruct, on this CPU, turns the
# demo annotations into MIMIC-IT instruction data for two tasks (la_short_answers: one image;
# dc_clip_events: a clip's frames), in English and one more language; the mimicit dataset reads the
# files back and the otter_mimicit `smoke` recipe trains on them. Prints per task: items, parse rate,
# pairs kept, translations, rejects by reason, LLM calls and wall time; then a few pairs of each file.
#
#   bash benchmarks/syphus_smollm2.sh [WORK_DIR]          (default runs/syphus_smollm2)
#   DRY_RUN=1 bash benchmarks/syphus_smollm2.sh /tmp/x    renders the prompts only: no model is loaded
#
# Knobs (environment): LIMIT_LA (default 120 images, up to 3 pairs each), LIMIT_DC (60 clips, up to 2
# pairs each), LANG2 (es; any of zh ja es de fr ko ar), MAX_NEW_TOKENS (160), BATCH_SIZE (8),
# PYTHON (python). A rerun reuses the LLM call cache in WORK_DIR/gen/cache: it is free and reports the
# cached calls, so measure wall time on a fresh WORK_DIR.
set -euo pipefail

PY=${PYTHON:-python}
WORK=${1:-runs/syphus_smollm2}
LIMIT_LA=${LIMIT_LA:-120}
LIMIT_DC=${LIMIT_DC:-60}
LANG2=${LANG2:-es}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-160}
BATCH_SIZE=${BATCH_SIZE:-8}
DRY=()
[[ -n "${DRY_RUN:-}" ]] && DRY=(--dry-run)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

recipes() { "$PY" -m vlmkit.core.cli "$@"; }
mkdir -p "$WORK"
t0=$(date +%s)

# 1. annotations of the demo's training scenes (200 images) and clips (96 x 4 frames)
if [[ ! -f "$WORK/ann/annotations.jsonl" ]]; then
  recipes data annotate-demo --out "$WORK/ann" --split train
fi

# 2. generation with the transformers backend (no model option: the packaged SmolLM2 GGUF)
for spec in "la_short_answers:$LIMIT_LA" "dc_clip_events:$LIMIT_DC"; do
  task=${spec%%:*}; limit=${spec##*:}
  s=$(date +%s)
  recipes data generate "$task" --annotations "$WORK/ann/annotations.jsonl" --out "$WORK/gen" \
    --backend transformers --backend-option "max_new_tokens=$MAX_NEW_TOKENS" \
    --backend-option "batch_size=$BATCH_SIZE" --languages "$LANG2" --limit "$limit" "${DRY[@]}"
  echo "$task: wall time $(( $(date +%s) - s )) s"
done

if [[ -n "${DRY_RUN:-}" ]]; then
  wc -l "$WORK"/gen/*_prompts.jsonl
  echo "dry run: prompts in $WORK/gen; nothing was generated or trained"
  exit 0
fi

# 3. the numbers, a few pairs per file, and the mimicit dataset reading every file back
"$PY" - "$WORK/gen" "$LANG2" <<'EOF'
import json, sys
from pathlib import Path
from vlmkit.datasets.mimicit import MimicIT, MimicITConfig

gen, lang = Path(sys.argv[1]), sys.argv[2]
print("\n| task | items | parsed answers | parse rate | pairs (en) | pairs (%s) | rejects | LLM calls (cached) | s |" % lang)
print("|---|---|---|---|---|---|---|---|---|")
for prefix, group in (("LA", "IMAGE_TEXT"), ("DC", "VIDEO_TEXT")):
    r = json.loads((gen / f"{prefix}_report.json").read_text())
    rate = r["parsed_items"] / r["items"] if r["items"] else 0.0
    rejects = ", ".join(f"{k} {v}" for k, v in r["rejects"].items())
    print(f"| {prefix} | {r['items']} | {r['parsed_items']} | {rate:.0%} | {r['pairs']} | "
          f"{r['translations'].get(lang, 0)} | {rejects} | {r['calls']} ({r['cached']}) | {r['seconds']:.0f} |")
for prefix, group in (("LA", "IMAGE_TEXT"), ("DC", "VIDEO_TEXT")):
    for suffix in ("", f"_{lang}"):
        ins = gen / f"{prefix}_instructions{suffix}.json"
        data = json.loads(ins.read_text())["data"]
        n = 0
        if data:
            ds = MimicIT(MimicITConfig(instructions=ins, images=gen / f"{prefix}.parquet",
                                       train_config=gen / f"{prefix}_train{suffix}.json", group=group,
                                       on_error="fail"))
            n = len(ds)
            _ = ds[0]
        print(f"\n{ins.name}: {len(data)} pairs, the mimicit dataset reads {n}")
        for key in list(data)[:3]:
            print(f"  {key}  Q: {data[key]['instruction']}\n  {' ' * len(key)}  A: {data[key]['answer']}")
EOF

# 4. the smoke recipe trains on the generated English files (images, in-context and video entries)
G="$WORK/gen"
recipes run otter_mimicit --profile smoke --output-dir "$WORK/smoke_run" --no-progress \
  --set "data.images.instructions=$G/LA_instructions.json" --set "data.images.images=$G/LA.parquet" \
  --set "data.images.train_config=$G/LA_train.json" \
  --set "data.in_context.instructions=$G/LA_instructions.json" --set "data.in_context.images=$G/LA.parquet" \
  --set "data.in_context.train_config=$G/LA_train.json" \
  --set "data.video.instructions=$G/DC_instructions.json" --set "data.video.images=$G/DC.parquet" \
  --set "data.video.train_config=$G/DC_train.json"

echo "total wall time $(( $(date +%s) - t0 )) s"
