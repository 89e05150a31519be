"""Turning :class:`~vlmkit.core.interfaces.Sample` records into a batch.

Labels come from the segments as they are tokenised, piece by piece: a token is trained exactly
when it was produced by a trained segment, so the loss mask can never drift from the text (the
"tokenization mismatch" of LLaVA cannot happen). Templates write the end markers (EOS,
``<|endofchunk|>``) into their trained segments themselves.

Truncation to ``max_length`` never cuts through an image's tokens or an answer: it drops whole
in-context examples (``Sample.units``) from the front; a sample whose query alone is too long is
left out of the batch. Both are counted in :attr:`Collator.stats`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
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


def _frames(image: Any) -> list[Any]:
    return list(image) if isinstance(image, (list, tuple)) else [image]


@dataclass
class Collator:
    """``list[Sample]`` -> a batch dict.

    Returns ``input_ids, attention_mask, labels (B, L)``, ``vision_x (B, T_img, F, 3, S, S)``,
    ``media_mask (B, T_img)`` (True for real images) and ``ids`` (the sample ids). Every image of a
    batch has the same number of frames ``F`` (1 for still images; datasets are drawn one per batch).

    ``placeholder_tokens``: ``<image>`` tokens per image, an int or a function of the frame count.
    """

    tokenizer: Any
    preprocess: Preprocess
    image_token: str
    placeholder_tokens: int | Callable[[int], int]
    padding_side: str = "right"
    add_bos: bool = True
    max_length: int | None = None
    stats: Counter = field(default_factory=Counter)  # dropped_examples, truncated_samples, dropped_samples
    dropped_ids: list[str] = field(default_factory=list)  # the first samples left out for length

    def __post_init__(self) -> None:
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        if self.padding_side not in {"left", "right"}:
            raise ValueError("padding_side must be 'left' or 'right'")

    def _placeholders(self, frames: int) -> int:
        p = self.placeholder_tokens
        return p(frames) if callable(p) else p

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Token ids and labels of a sample, without truncation."""
        tok = self.tokenizer
        ids: list[int] = []
        labels: list[int] = []
        first = sample.segments[0][0] if sample.segments else ""
        if self.add_bos and tok.bos_token_id is not None and not (tok.bos_token and first.startswith(tok.bos_token)):
            ids.append(tok.bos_token_id)  # unless the template's text already starts with it (chat templates)
            labels.append(IGNORE)
        images = list(sample.images)
        n_images = 0
        for text, trained in sample.segments:
            pieces = text.split(self.image_token)
            for i, piece in enumerate(pieces):
                if i > 0:
                    if n_images >= len(images):
                        raise VlmkitError(
                            f"sample '{sample.id}': its text has more {self.image_token} markers than its "
                            f"{len(images)} images"
                        )
                    n = self._placeholders(len(_frames(images[n_images])))
                    ids.extend([self.image_token_id] * n)
                    labels.extend([IGNORE] * n)
                    n_images += 1
                if piece:
                    piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                    ids.extend(piece_ids)
                    labels.extend(piece_ids if trained else [IGNORE] * len(piece_ids))
        if n_images != len(images):
            raise VlmkitError(
                f"sample '{sample.id}': its text has {n_images} {self.image_token} markers but it has "
                f"{len(images)} images"
            )
        return ids, labels

    def fit(self, sample: Sample) -> tuple[Sample, list[int], list[int]] | None:
        """The sample truncated to ``max_length`` by dropping in-context examples from the front
        (``None`` if even its query is too long)."""
        ids, labels = self.encode(sample)
        if self.max_length is None or len(ids) <= self.max_length:
            return sample, ids, labels
        units = list(sample.units)
        while units and len(ids) > self.max_length:
            seg0, seg1, img0, img1 = units.pop(0)
            seg_shift, img_shift = seg1 - seg0, img1 - img0
            sample = Sample(
                id=sample.id,
                images=sample.images[:img0] + sample.images[img1:],
                segments=sample.segments[:seg0] + sample.segments[seg1:],
                units=[(a - seg_shift, b - seg_shift, c - img_shift, d - img_shift) for a, b, c, d in units],
            )
            self.stats["dropped_examples"] += 1
            ids, labels = self.encode(sample)
        if len(ids) > self.max_length:
            self.stats["dropped_samples"] += 1
            if len(self.dropped_ids) < 5:
                self.dropped_ids.append(sample.id)
            return None
        self.stats["truncated_samples"] += 1
        return sample, ids, labels

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        fitted = [f for f in (self.fit(s) for s in samples) if f is not None]
        if not fitted:
            raise VlmkitError(
                f"every sample of a batch is longer than max_length {self.max_length} even without in-context "
                f"examples (e.g. {samples[0].id}); raise the stage's max_length"
            )
        samples = [f[0] for f in fitted]
        encoded = [(f[1], f[2]) for f in fitted]
        length = max(len(ids) for ids, _ in encoded)
        pad_id = self.tokenizer.pad_token_id
        B = len(samples)
        input_ids = torch.full((B, length), pad_id, dtype=torch.long)
        labels = torch.full((B, length), IGNORE, dtype=torch.long)
        attention = torch.zeros((B, length), dtype=torch.long)
        for b, (ids, labs) in enumerate(encoded):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
            labels[b, sl] = torch.tensor(labs, dtype=torch.long)
            attention[b, sl] = 1
        frame_counts = {len(_frames(img)) for s in samples for img in s.images}
        if len(frame_counts) > 1:
            raise VlmkitError(
                f"a batch mixes media of {sorted(frame_counts)} frames (samples {', '.join(s.id for s in samples)}); "
                "still images and video clips must come from different datasets"
            )
        F = frame_counts.pop() if frame_counts else 1
        t_img = max(1, max(len(s.images) for s in samples))
        size = self.preprocess.image_size
        vision_x = torch.zeros((B, t_img, F, 3, size, size))
        media_mask = torch.zeros((B, t_img), dtype=torch.bool)
        for b, s in enumerate(samples):
            for t, image in enumerate(s.images):
                for f, frame in enumerate(_frames(image)):
                    vision_x[b, t, f] = image_to_tensor(frame, self.preprocess)
                media_mask[b, t] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "vision_x": vision_x,
            "media_mask": media_mask,
            "ids": [s.id for s in samples],
        }
