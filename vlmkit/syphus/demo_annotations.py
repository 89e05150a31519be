"""Annotations of the demo data (``DEMO_scenes.json``), so the offline pipeline has real input: one
item per still scene (its caption and a box per object) and one per clip (its frames with times at
1 fps, a caption per moving shape, boxes of the first frame). Images are written beside the
annotations file (scenes copied from the demo's PNGs, clip frames drawn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.demo import data as demo  # the one place this module reaches the demo generator
from vlmkit.core.errors import VlmkitError
from vlmkit.syphus.writer import atomic_write_bytes, atomic_write_text

__all__ = ["demo_annotations", "write_demo_annotations"]

_ROW = ("top", "middle", "bottom")


def _scene_item(image_id: str, scene: dict[str, Any]) -> dict[str, Any]:
    boxes = [[f"{o['colour']} {o['shape']}", o["cx"] - o["r"], o["cy"] - o["r"], o["cx"] + o["r"], o["cy"] + o["r"]]
             for o in scene["objects"]]
    return {"id": image_id, "media": [f"media/{image_id}.png"], "captions": [demo.scene_caption(scene)], "boxes": boxes}


def _lane(obj: dict[str, Any], size: int) -> str:
    x, y = obj["path"][0]
    if obj["direction"] in ("left", "right"):
        return f"along the {_ROW[min(2, int(3 * y / size))]} row"
    return f"along the {('left', 'middle', 'right')[min(2, int(3 * x / size))]} column"


def _clip_item(clip_id: str, clip: dict[str, Any]) -> dict[str, Any]:
    frames = clip["frames"]
    end = len(frames) - 1
    captions = [f"from 0 s to {end} s a {o['colour']} {o['shape']} moves {o['direction']} {_lane(o, clip['size'])}"
                for o in clip["objects"]]
    r = clip["r"]
    boxes = [[f"{o['colour']} {o['shape']}", o["path"][0][0] - r, o["path"][0][1] - r, o["path"][0][0] + r,
              o["path"][0][1] + r] for o in clip["objects"]]
    return {"id": clip_id, "media": [f"media/{f}.png" for f in frames], "captions": captions, "boxes": boxes,
            "timestamps": [float(t) for t in range(len(frames))]}


def demo_annotations(demo_dir: Path, split: str = "train") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The annotation items of a demo folder's ``split`` and the scenes file."""
    path = Path(demo_dir) / demo.FILES["scenes"]
    if not path.is_file():
        raise VlmkitError(f"--demo: '{demo_dir}' holds no {demo.FILES['scenes']} (write one with `recipes data demo`)")
    scenes = json.loads(path.read_text(encoding="utf-8"))
    items = [_scene_item(k, s) for k, s in scenes["scenes"].items() if split == "all" or s["split"] == split]
    items += [_clip_item(k, c) for k, c in scenes["clips"].items() if split == "all" or c["split"] == split]
    return items, scenes


def write_demo_annotations(demo_dir: Path, out: Path, split: str = "train") -> dict[str, int]:
    """``out/annotations.jsonl`` and ``out/media/`` from the demo folder; counts of what was written."""
    out = Path(out)
    target = out / "annotations.jsonl"
    if target.exists():
        raise VlmkitError(f"--out: '{target}' exists; give a new folder (nothing is overwritten)")
    items, scenes = demo_annotations(demo_dir, split)
    (out / "media").mkdir(parents=True, exist_ok=True)
    frames = 0
    for item in items:
        if item["id"] in scenes["scenes"]:
            source = Path(demo_dir) / demo.FILES["image_folder"] / f"{item['id']}.png"
            png = source.read_bytes() if source.is_file() else _png(demo.render_scene(scenes["scenes"][item["id"]]))
            atomic_write_bytes(out / item["media"][0], png)
        else:
            clip = scenes["clips"][item["id"]]
            for f, rel in enumerate(item["media"]):
                atomic_write_bytes(out / rel, _png(demo.render_frame(clip, f)))
                frames += 1
    atomic_write_text(target, "".join(json.dumps(i) + "\n" for i in items))
    return {"items": len(items), "scenes": sum(1 for i in items if i["id"] in scenes["scenes"]),
            "clips": sum(1 for i in items if i["id"] in scenes["clips"]), "frames": frames}


def _png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
