"""Turning :class:`~vlmkit.core.interfaces.Sample` records into a batch.

Labels come from the segments as they are tokenised, piece by piece: a token is trained exactly
when it was produced by a trained segment (or is the closing end-of-text after a trained final
segment), so the loss mask can never drift from the text ("tokenization mismatch").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Preprocess, Sample

IGNORE = -100


def image_to_tensor(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """A PIL image -> ``(3, S, S)`` float tensor resized and normalised as ``pre`` says."""
    image = image.convert("RGB").resize((pre.image_size, pre.image_size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (tensor - mean) / std


@dataclass
class Collator:
    """``list[Sample]`` -> a batch dict.

    Returns ``input_ids, attention_mask, labels (B, L)``, ``vision_x (B, T_img, F=1, 3, S, S)``,
    ``media_mask (B, T_img)`` (True for real images) and ``ids`` (the sample ids).
    """

    tokenizer: Any
    preprocess: Preprocess
    image_token: str
    placeholder_tokens: int
    padding_side: str = "right"
    add_bos: bool = True

    def __post_init__(self) -> None:
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        if self.padding_side not in {"left", "right"}:
            raise ValueError("padding_side must be 'left' or 'right'")

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids: list[int] = []
        labels: list[int] = []
        if self.add_bos and tok.bos_token_id is not None:
            ids.append(tok.bos_token_id)
            labels.append(IGNORE)
        n_images = 0
        for text, trained in sample.segments:
            pieces = text.split(self.image_token)
            for i, piece in enumerate(pieces):
                if i > 0:
                    ids.extend([self.image_token_id] * self.placeholder_tokens)
                    labels.extend([IGNORE] * self.placeholder_tokens)
                    n_images += 1
                if piece:
                    piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                    ids.extend(piece_ids)
                    labels.extend(piece_ids if trained else [IGNORE] * len(piece_ids))
        if sample.segments and sample.segments[-1][1] and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
            labels.append(tok.eos_token_id)
        if n_images != len(sample.images):
            raise VlmkitError(
                f"sample '{sample.id}': its text has {n_images} {self.image_token} markers but it has "
                f"{len(sample.images)} images"
            )
        return ids, labels

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        encoded = [self.encode(s) for s in samples]
        length = max(len(ids) for ids, _ in encoded)
        pad_id = self.tokenizer.pad_token_id
        B = len(samples)
        input_ids = torch.full((B, length), pad_id, dtype=torch.long)
        labels = torch.full((B, length), IGNORE, dtype=torch.long)
        attention = torch.zeros((B, length), dtype=torch.long)
        for b, (ids, labs) in enumerate(encoded):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[b, sl] = torch.tensor(ids)
            labels[b, sl] = torch.tensor(labs)
            attention[b, sl] = 1
        t_img = max(1, max(len(s.images) for s in samples))
        size = self.preprocess.image_size
        vision_x = torch.zeros((B, t_img, 1, 3, size, size))
        media_mask = torch.zeros((B, t_img), dtype=torch.bool)
        for b, s in enumerate(samples):
            for t, image in enumerate(s.images):
                vision_x[b, t, 0] = image_to_tensor(image, self.preprocess)
                media_mask[b, t] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "vision_x": vision_x,
            "media_mask": media_mask,
            "ids": [s.id for s in samples],
        }
