"""The feature ceiling of each demo question type: can a linear probe read the answers from the
frozen encoder's features?

For the encoder of a recipe (by default ``otter_mimicit``'s ``demo`` profile: the packaged
EfficientNet-Lite0 at the recipe's ``feature_stage``), built alone through the registry, this
extracts the features of the demo data's training and held-out scenes and clips and fits, per
question type and question target (for "What colour are the squares?" the target is the squares:
label = the squares' colour; for "Which shape is moving up?" the direction up), a linear probe
(closed-form ridge regression on one-hot answers, the regularisation chosen by 5-fold
cross-validation on the training side) on four fixed poolings of the token map:

- ``mean``: the tokens' mean (one vector of the encoder's width per image);
- ``columns``: the map averaged into 3 columns (left, middle, right);
- ``grid``: the map averaged into a 3x3 grid;
- ``tokens``: every token (no pooling: what the perceiver reads).

A clip's features are its frames' pooled features, concatenated in time order (all its frames:
as many as the recipe's ``num_frames`` for the demo's sizes). It prints the held-out accuracy of
every type for every pooling, the best of them (the type's feature ceiling) and whether it
reaches ``--goal`` (0.95), with the held-out answers' spread (distinct answers, majority share:
what answering without the image reaches at best).

By default the data are generated in memory (:func:`vlmkit.demo.data.build_demo`, the
recipe's seed): the first ``--train-scenes`` training scenes (200: exactly the demo's) and the
first ``--eval-scenes`` held-out scenes (the demo's 40 and more drawn alike), every question of
every type asked of each; clips likewise (320 training clips by default, more than the demo's 96:
the probes of two moving shapes need them). ``--data DIR`` probes a written demo folder instead
(any version with a ``DEMO_scenes.json``), its instructions as they are asked. About 3 minutes on
2 CPU cores (1900 images).

    python benchmarks/probe_demo_features.py
    python benchmarks/probe_demo_features.py --encoder-stage -2 --train-clips 0 --eval-clips 0
    python benchmarks/probe_demo_features.py --data ~/.cache/vlmkit/demo-3-0
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit.demo import data as demo
from vlmkit.core.data.collate import image_to_tensor
from vlmkit.datasets.mimicit import resample_frames
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import get_registry

POOLINGS = ("mean", "columns", "grid", "tokens")
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the kernel's mean diagonal
FOLDS = 5


# ------------------------------------------------------------------------------------------ samples
def samples_from_builder(seed: int, counts: dict[str, int],
                         frames: int) -> tuple[list[dict[str, Any]], dict[str, Image.Image]]:
    """Every question of every type about each generated scene and clip (split, type, target,
    image ids: a clip's ``frames`` frames as the recipe resamples them, answer) and the images,
    decoded from the PNGs the demo data would write."""
    built = demo.build_demo(seed, "small", counts=counts)
    samples = []
    for split, image_ids in (("train", built.train_scenes), ("eval", built.eval_scenes)):
        for image_id in image_ids:
            scene = built.scenes[image_id]
            for kind in demo.SCENE_KINDS:
                for target in demo.scene_targets(kind):
                    samples.append({"split": split, "type": kind, "target": target, "image_ids": [image_id],
                                    "answer": demo.scene_answer(kind, target, scene)})
    for clip in built.clips.values():
        for kind in demo.CLIP_KINDS:
            for target in demo.clip_targets(kind, clip):
                samples.append({"split": clip["split"], "type": f"video {kind}", "target": target,
                                "image_ids": resample_frames(clip["frames"], frames),
                                "answer": demo.clip_answer(kind, target, clip)})
    images = {image_id: Image.open(io.BytesIO(png)).convert("RGB") for image_id, png in built.images}
    return samples, images


def samples_from_dir(root: Path, frames: int) -> tuple[list[dict[str, Any]], dict[str, Image.Image]]:
    """The instructions of a written demo folder as they are asked (training and held out; a clip's
    ``frames`` frames as the recipe resamples them), and its images from the parquet file."""
    import pyarrow.parquet as pq

    described = json.loads((root / "DEMO_scenes.json").read_text(encoding="utf-8"))["instructions"]
    samples = []
    for name, split in (("DEMO_instructions.json", "train"), ("DEMO_VIDEO_instructions.json", "train"),
                        ("DEMO_EVAL_instructions.json", "eval"), ("DEMO_VIDEO_EVAL_instructions.json", "eval")):
        for ins_id, record in json.loads((root / name).read_text(encoding="utf-8"))["data"].items():
            q = described[ins_id]
            kind = f"video {q['kind']}" if "VIDEO" in name else q["kind"]
            image_ids = resample_frames(record["image_ids"], frames) if "VIDEO" in name else record["image_ids"]
            samples.append({"split": split, "type": kind, "target": q.get("target", q.get("shape")),
                            "image_ids": image_ids, "answer": record["answer"]})
    needed = {i for s in samples for i in s["image_ids"]}
    table = pq.read_table(root / "DEMO.parquet")
    images = {}
    for image_id, value in zip(table.column("id").to_pylist(), table.column("base64").to_pylist()):
        if image_id in needed:
            images[image_id] = Image.open(io.BytesIO(base64.urlsafe_b64decode(value))).convert("RGB")
    return samples, images


# ----------------------------------------------------------------------------------------- features
def build_encoder(recipe: str, profile: str | None, stage: int | None) -> tuple[Any, Any]:
    """The recipe's encoder alone (no decoder is built), in eval mode; ``stage`` overrides its
    ``feature_stage``."""
    overrides = [] if stage is None else [f"model.encoder.feature_stage={stage}"]
    resolved = load_recipe(recipe, profile, overrides)
    spec = resolved.components["encoder"]
    from vlmkit.core.interfaces import BuildContext

    encoder = get_registry().component_class("encoder", spec.name).build(spec.config, BuildContext()).eval()
    return encoder, resolved


def pooled_features(encoder: Any, images: dict[str, Image.Image], batch: int) -> dict[str, dict[str, torch.Tensor]]:
    """image id -> pooling -> a flat feature vector."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    ids = sorted(images)
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            pix = torch.stack([image_to_tensor(images[i], encoder.preprocess) for i in chunk])
            tokens = encoder(pix).float()  # (N, T, C)
            n, t, c = tokens.shape
            side = int(round(t ** 0.5))
            if side * side != t:
                raise SystemExit(f"the encoder gives {t} tokens per image: not a square map, no spatial pooling")
            grid = tokens.transpose(1, 2).reshape(n, c, side, side)
            pools = {
                "mean": tokens.mean(1),
                "columns": torch.nn.functional.adaptive_avg_pool2d(grid, (1, 3)).flatten(1),
                "grid": torch.nn.functional.adaptive_avg_pool2d(grid, (3, 3)).flatten(1),
                "tokens": tokens.flatten(1),
            }
            for k, image_id in enumerate(chunk):
                out[image_id] = {name: value[k] for name, value in pools.items()}
    return out


# -------------------------------------------------------------------------------------------- probe
def ridge_probe(x_train: torch.Tensor, y_train: list[str], x_eval: torch.Tensor) -> list[str]:
    """Closed-form ridge regression on one-hot answers (dual form, standardised features and a
    bias), its strength chosen by 5-fold cross-validation on the training side; the predicted
    answers of ``x_eval``."""
    classes = sorted(set(y_train))
    if len(classes) == 1:
        return [classes[0]] * len(x_eval)
    x_train, x_eval = x_train.double(), x_eval.double()
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_eval - mu) / sd
    k_train = a @ a.T + 1.0
    k_eval = b @ a.T + 1.0
    y = torch.zeros(len(y_train), len(classes), dtype=torch.float64)
    y[torch.arange(len(y_train)), torch.tensor([classes.index(v) for v in y_train])] = 1.0
    scale = k_train.diagonal().mean()
    n = len(y_train)
    folds = torch.arange(n) % FOLDS

    def solve(rows: torch.Tensor, lam: float) -> torch.Tensor:
        k = k_train[rows][:, rows]
        return torch.linalg.solve(k + lam * scale * torch.eye(len(k), dtype=torch.float64), y[rows] - y[rows].mean(0))

    best, best_lam = -1.0, LAMBDAS[0]
    for lam in LAMBDAS:
        right = 0
        for f in range(FOLDS):
            tr, va = (folds != f).nonzero().flatten(), (folds == f).nonzero().flatten()
            pred = k_train[va][:, tr] @ solve(tr, lam) + y[tr].mean(0)
            right += int((pred.argmax(1) == y[va].argmax(1)).sum())
        if right > best:
            best, best_lam = right, lam
    everything = torch.arange(n)
    pred = k_eval @ solve(everything, best_lam) + y.mean(0)
    return [classes[i] for i in pred.argmax(1).tolist()]


def probe_all(samples: list[dict[str, Any]], feats: dict[str, dict[str, torch.Tensor]],
              poolings: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per question type: held-out accuracy per pooling (a probe per target, pooled over the
    targets), the held-out answers' spread."""
    groups: dict[tuple[str, Any], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: {"train": [], "eval": []})
    for s in samples:
        groups[(s["type"], s["target"])][s["split"]].append(s)
    results: dict[str, dict[str, Any]] = {}
    for (kind, _target), parts in sorted(groups.items(), key=lambda g: (g[0][0], str(g[0][1]))):
        if not parts["train"] or not parts["eval"]:
            continue
        row = results.setdefault(kind, {"n": 0, "answers": Counter(), "right": Counter()})
        row["n"] += len(parts["eval"])
        row["answers"].update(s["answer"] for s in parts["eval"])
        for pooling in poolings:
            def x(split: str) -> torch.Tensor:
                return torch.stack([torch.cat([feats[i][pooling] for i in s["image_ids"]]) for s in parts[split]])

            predicted = ridge_probe(x("train"), [s["answer"] for s in parts["train"]], x("eval"))
            row["right"][pooling] += sum(p == s["answer"] for p, s in zip(predicted, parts["eval"]))
    for row in results.values():
        row["accuracy"] = {p: row["right"][p] / row["n"] for p in poolings}
        row["ceiling"] = max(row["accuracy"].values())
        row["majority"] = row["answers"].most_common(1)[0][1] / row["n"]
    return results


def table(results: dict[str, dict[str, Any]], poolings: tuple[str, ...], goal: float) -> str:
    order = [*demo.SCENE_KINDS, *(f"video {k}" for k in demo.CLIP_KINDS)]
    kinds = [k for k in order if k in results] + sorted(k for k in results if k not in order)
    head = ["type", "n held out", "answers", "majority", *poolings, "ceiling", f">= {goal}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in kinds:
        row = results[kind]
        cells = [kind, str(row["n"]), str(len(row["answers"])), f"{row['majority']:.2f}",
                 *(f"{row['accuracy'][p]:.3f}" for p in poolings), f"{row['ceiling']:.3f}",
                 "yes" if row["ceiling"] >= goal else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="otter_mimicit")
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--encoder-stage", type=int, default=None,
                        help="the encoder's feature_stage (default: the recipe's)")
    parser.add_argument("--data", type=Path, default=None,
                        help="probe a written demo folder (its instructions as asked) instead of generated data")
    parser.add_argument("--seed", type=int, default=None, help="demo data seed (default: the recipe's)")
    parser.add_argument("--train-scenes", type=int, default=200)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--train-clips", type=int, default=320)
    parser.add_argument("--eval-clips", type=int, default=80)
    parser.add_argument("--poolings", default=",".join(POOLINGS), help=f"some of {', '.join(POOLINGS)}")
    parser.add_argument("--goal", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    poolings = tuple(p for p in args.poolings.split(",") if p)
    if not set(poolings) <= set(POOLINGS):
        parser.error(f"--poolings: choose from {', '.join(POOLINGS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()

    encoder, resolved = build_encoder(args.recipe, args.profile, args.encoder_stage)
    enc_cfg = resolved.components["encoder"].config
    seed = resolved.recipe.seed if args.seed is None else args.seed
    # the frames per clip the recipe's video data reads (its first VIDEO_TEXT entry)
    frames = next((int(spec.config.num_frames) for spec in resolved.datasets.values()
                   if getattr(spec.config, "group", None) == "VIDEO_TEXT"), demo.SIZES["small"]["frames"])
    if args.data is not None:
        samples, images = samples_from_dir(args.data.expanduser(), frames)
        source = f"{args.data} (its instructions as asked)"
    else:
        counts = {"train_scenes": args.train_scenes, "eval_scenes": args.eval_scenes,
                  "train_clips": args.train_clips, "eval_clips": args.eval_clips}
        samples, images = samples_from_builder(seed, counts, frames)
        source = (f"demo data version {demo.DEMO_VERSION}, seed {seed}, generated: {args.train_scenes} training and "
                  f"{args.eval_scenes} held-out scenes, {args.train_clips} and {args.eval_clips} clips, every question "
                  "of every type asked of each")
    print(f"encoder: {resolved.components['encoder'].name} {getattr(enc_cfg, 'model_name', '')} "
          f"feature_stage={getattr(enc_cfg, 'feature_stage', None)} ({args.recipe}, profile {args.profile}); "
          f"{encoder.num_tokens()} tokens of width {encoder.width}")
    needed = {i for s in samples for i in s["image_ids"]}
    images = {i: image for i, image in images.items() if i in needed}
    print(f"data: {source}; {len(images)} images, {frames} frames per clip")
    feats = pooled_features(encoder, images, args.batch)
    extracted = time.time() - started
    results = probe_all(samples, feats, poolings)
    print(table(results, poolings, args.goal))
    below = [k for k, r in results.items() if r["ceiling"] < args.goal]
    print(f"ceiling >= {args.goal}: " + ("every type" if not below else "not for " + ", ".join(below)))
    print(f"({extracted:.0f} s features, {time.time() - started - extracted:.0f} s probes)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {k: {"n": r["n"], "answers": dict(r["answers"]), "majority": r["majority"], "accuracy": r["accuracy"],
                   "ceiling": r["ceiling"]} for k, r in results.items()}
        args.json.write_text(json.dumps({"source": source, "feature_stage": getattr(enc_cfg, "feature_stage", None),
                                         "results": out}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
