"""How well the frozen encoder's features alone separate each held-out novel concept from its look-alike.

A ceiling for any model that reads these features: for 2-way episodes of the synthetic held-out
pairs (``${lcl_data}``), the query goes to the class of its most similar support picture (cosine of
the encoder's mean-pooled features). Printed and written to ``docs/lcl/feature_oracle.md`` for
each image size and support pictures per class.

    python benchmarks/lcl_feature_oracle.py --sizes 64,128
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image

from vlmkit.core.data.collate import image_to_tensor
from vlmkit.lcl.synthetic_concepts import concepts_data_dir
from vlmkit.core.interfaces import BuildContext
from vlmkit.core.registry import get_registry


def features(size: int, root: Path, names: set[str]) -> dict[str, torch.Tensor]:
    cls = get_registry().component_class("encoder", "timm")
    config = cls.Config(model_name="efficientnet_lite0", packaged_weights="efficientnet_lite0", feature_stage=-1,
                        image_size=size)
    encoder = cls.build(config, BuildContext()).eval()
    out = {}
    with torch.no_grad():
        for name in sorted(names):
            files = sorted((root / "heldout" / name).glob("*.png"))
            pix = torch.stack([image_to_tensor(Image.open(f).convert("RGB"), encoder.preprocess) for f in files])
            out[name] = torch.nn.functional.normalize(encoder(pix).mean(1), dim=-1)  # (pictures, width)
    return out


def accuracy(feats: dict[str, torch.Tensor], pairs: dict[str, str], per_class: int, episodes: int, seed: int) -> float:
    rng = random.Random(seed)
    right = 0
    for t in range(episodes):
        pos = rng.choice(sorted(pairs))
        a, b = feats[pos], feats[pairs[pos]]
        ia, ib = rng.sample(range(len(a)), per_class + 1), rng.sample(range(len(b)), per_class + 1)
        query_positive = t % 2 == 0
        q = a[ia[-1]] if query_positive else b[ib[-1]]
        right += bool(((a[ia[:per_class]] @ q).max() > (b[ib[:per_class]] @ q).max()) == query_positive)
    return right / episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128", help="encoder input sizes (px)")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--out", default="docs/lcl/feature_oracle.md")
    args = parser.parse_args()
    root = concepts_data_dir()
    pairs = json.loads((root / "heldout_pairs.json").read_text())
    shots = (1, 2, 4, 8)
    lines = ["| encoder input | " + " | ".join(f"{2 * k} shots" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    for size in [int(s) for s in args.sizes.split(",")]:
        feats = features(size, root, set(pairs) | set(pairs.values()))
        row = [accuracy(feats, pairs, k, args.episodes, seed=0) for k in shots]
        lines.append(f"| {size} px | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
