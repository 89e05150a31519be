"""A synthetic ISEKAI-like benchmark: invented concepts and the real concepts they resemble.

REFERENCE 1.5: ISEKAI pairs each novel concept (an invented name for a thing no model has seen)
with a similar real concept as its hard negative. Here the "real" concepts are plain shapes in a
colour ("red circle"); a novel concept is a composite: a body shape and colour (its real look-alike)
plus a distinguishing feature (a small shape of another colour on top, stripes or dots), called by
an invented word. Each image varies the position, size, rotation, background and colour slightly.

:func:`write_concepts` writes::

    train/<class_name>/<nn>.png      class folders for LCL training (every plain shape, and
                                     composites with descriptive names: "red_circle_with_blue_square")
    heldout/<name>/<nn>.png          held-out novel concepts (invented folder names) and their
                                     look-alikes (real names); no held-out composite is a training class
    heldout_pairs.json               {novel concept: its hard negative}
    concepts.json                    what every class is (body, colour, feature), the seed, counts

The same ``seed`` gives byte-identical files. :func:`concepts_data_dir` keeps one copy per seed
in the user's cache, written once, atomically (the ``${lcl_data}`` recipe placeholder).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.demo.data import cached_folder

#: bump when the generated data changes
CONCEPTS_VERSION = 1

BODY_SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
COLOURS = {
    "red": (215, 35, 35), "green": (40, 165, 50), "blue": (35, 70, 215), "yellow": (235, 205, 25),
    "purple": (140, 50, 180), "orange": (245, 130, 20), "cyan": (30, 190, 200),
}
PART_SHAPES = ("circle", "square", "triangle")
PATTERNS = ("striped", "dotted")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Concept:
    """What one class draws: a ``body`` shape in ``colour``, and optionally a ``part`` (a small
    ``part`` shape in ``part_colour`` on top) or a ``pattern``."""

    body: str
    colour: str
    part: str | None = None
    part_colour: str | None = None
    pattern: str | None = None

    @property
    def real_name(self) -> str:
        """The descriptive name: "red circle", "red circle with blue square", "striped red circle"."""
        base = f"{self.colour} {self.body}"
        if self.pattern:
            return f"{self.pattern} {base}"
        if self.part:
            return f"{base} with {self.part_colour} {self.part}"
        return base

    @property
    def look_alike(self) -> "Concept":
        """The plain shape it resembles (its hard negative)."""
        return Concept(self.body, self.colour)

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def invented_word(rng: random.Random, letters: tuple[int, int] = (3, 8)) -> str:
    """A pronounceable invented word of ``letters[0]..letters[1]`` letters (consonant-vowel pairs)."""
    n = rng.randint(*letters)
    word = "".join(rng.choice(_CONSONANTS) if i % 2 == 0 else rng.choice(_VOWELS) for i in range(n))
    return word


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = 4
        start = math.pi / 4
    elif shape == "triangle":
        corners, start = 3, -math.pi / 2
    elif shape == "diamond":
        corners, start = 4, 0.0
    elif shape == "hexagon":
        corners, start = 6, 0.0
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + angle + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    else:
        raise ValueError(shape)
    return [(cx + r * math.cos(start + angle + 2 * math.pi * i / corners),
             cy + r * math.sin(start + angle + 2 * math.pi * i / corners)) for i in range(corners)]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def render_concept(concept: Concept, rng: random.Random, size: int = 96) -> Image.Image:
    """One picture of ``concept``: the body at a random place, size and small rotation, on a
    random light background; the part above the body, the pattern across it."""
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.3) * size
    cx = rng.uniform(r + 2, size - r - 2)
    cy = rng.uniform(max(r + 2, 0.42 * size), size - r - 2)
    angle = rng.uniform(-0.25, 0.25)
    fill = _jitter(COLOURS[concept.colour], rng)
    _draw(draw, concept.body, cx, cy, r, angle, fill)
    if concept.pattern == "striped":
        mask = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(mask), concept.body, cx, cy, r, angle, 255)
        stripes = Image.new("RGB", (size, size), fill)
        sd = ImageDraw.Draw(stripes)
        step = max(4, int(r / 2.5))
        for x in range(-size, 2 * size, step):
            sd.line([(x, 0), (x + size // 2, size)], fill=(250, 250, 250), width=max(2, step // 3))
        image.paste(stripes, (0, 0), mask)
    elif concept.pattern == "dotted":
        dot = max(2.0, r / 6)
        for i in range(-2, 3):
            for j in range(-2, 3):
                x, y = cx + i * r / 2.4, cy + j * r / 2.4
                if (x - cx) ** 2 + (y - cy) ** 2 < (0.75 * r) ** 2:
                    draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=(250, 250, 250))
    if concept.part:
        pr = r * rng.uniform(0.45, 0.55)
        px = cx + rng.uniform(-0.2, 0.2) * r
        py = cy - r - pr * 0.6
        _draw(draw, concept.part, px, py, pr, 0.0, _jitter(COLOURS[concept.part_colour], rng))
    return image


def _all_composites() -> list[Concept]:
    out = []
    for body in BODY_SHAPES:
        for colour in COLOURS:
            for pattern in PATTERNS:
                out.append(Concept(body, colour, pattern=pattern))
            for part in PART_SHAPES:
                for part_colour in COLOURS:
                    if part_colour != colour:
                        out.append(Concept(body, colour, part=part, part_colour=part_colour))
    return out


def write_concepts(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    train_composites: int = 48,
    heldout_concepts: int = 20,
    train_images: int = 24,
    heldout_images: int = 20,
    image_size: int = 96,
) -> Path:
    """Write the benchmark into ``out`` (see the module doc); returns ``out``."""
    out = Path(out)
    rng = random.Random(f"concepts:{seed}")
    plain = [Concept(b, c) for b in BODY_SHAPES for c in COLOURS]
    composites = _all_composites()
    rng.shuffle(composites)
    train = composites[:train_composites]
    heldout = composites[train_composites:train_composites + heldout_concepts]
    taken = {c.real_name for c in plain + train}
    names: list[str] = []
    for _ in heldout:
        while True:
            word = invented_word(rng, (4, 8))
            if word not in names and word not in taken and not any(word in t.split() for t in taken):
                names.append(word)
                break

    def save(folder: Path, concept: Concept, count: int, tag: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = render_concept(concept, random.Random(f"{seed}:{tag}:{i}"), image_size)
            img.save(folder / f"{i:02d}.png", optimize=False)

    classes = {}
    for concept in plain + train:
        folder_name = concept.real_name.replace(" ", "_")
        save(out / "train" / folder_name, concept, train_images, f"train:{folder_name}")
        classes[f"train/{folder_name}"] = concept.as_dict()
    pairs = {}
    for word, concept in zip(names, heldout):
        negative = concept.look_alike.real_name.replace(" ", "_")
        save(out / "heldout" / word, concept, heldout_images, f"heldout:{word}")
        if not (out / "heldout" / negative).exists():
            save(out / "heldout" / negative, concept.look_alike, heldout_images, f"heldout:{negative}")
            classes[f"heldout/{negative}"] = concept.look_alike.as_dict()
        classes[f"heldout/{word}"] = {**concept.as_dict(), "looks_like": concept.real_name}
        pairs[word] = negative
    (out / "heldout_pairs.json").write_text(json.dumps(pairs, indent=1) + "\n", encoding="utf-8")
    meta = {"version": CONCEPTS_VERSION, "seed": seed, "image_size": image_size,
            "train_classes": len(plain) + len(train), "heldout_novel": len(heldout),
            "train_images_per_class": train_images, "heldout_images_per_class": heldout_images, "classes": classes}
    (out / "concepts.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def concepts_data_dir(seed: int = 0) -> Path:
    """The benchmark of ``seed`` in the user's cache (``<cache>/concepts-<version>-<seed>``),
    written on first use (see :func:`vlmkit.demo.data.cached_folder`)."""
    return cached_folder(f"concepts-{CONCEPTS_VERSION}-{int(seed)}", "concepts.json",
                         lambda tmp: write_concepts(tmp, seed=seed))
