"""``toy_captions``: generated images of one coloured shape each, captioned "a red circle".

Deterministic from ``seed``; used by the smoke recipes and the tests. Each record is a CAPTION
exchange (a fixed request, the caption as the answer) about one image; ``llava_plain`` renders it
as ``<image>`` then the caption, the caption trained."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw
from pydantic import Field, PositiveInt

from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.core.interfaces import Dataset, DatasetConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")


class ToyCaptionsConfig(DatasetConfig):
    num_samples: PositiveInt = Field(64, le=10_000_000, description="generated samples (at most 10 million)")
    image_size: int = Field(64, ge=16, le=1024)
    seed: int = 0


class ToyCaptions(Dataset):
    """Generated images of coloured shapes with captions, for smoke tests."""

    Config = ToyCaptionsConfig

    def __init__(self, config: ToyCaptionsConfig):
        super().__init__(config)

    def __len__(self) -> int:
        return self.config.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = random.Random(f"{self.config.seed}:{index}")
        colour = rng.choice(sorted(COLOURS))
        shape = rng.choice(SHAPES)
        image = draw_shape(self.config.image_size, colour, shape, rng)
        rid = f"toy-{index:05d}"
        return Record(
            id=rid,
            query=Exchange([Turn("user", "Describe the image."), Turn("assistant", f"a {colour} {shape}")],
                           media=[Media(rid, [image])]),
        )


def draw_shape(size: int, colour: str, shape: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image
