"""Turning :class:`~vlmkit.core.interfaces.Sample` records into a batch.

A sample's text (its segments joined) is tokenised ONCE, as a whole, so its tokens are the ones
the original projects produce for that text: a segment join never splits a word (``"USER: "`` +
``"Where"`` gives ``'ĠWhere'``, as the whole string does, not ``'Ġ', 'Where'``). The loss mask
comes from character spans, never from counting tokens: the tokenizer's offset mapping gives each
token its characters, and a token is trained iff at least one of its characters lies in a trained
segment. So every trained character is in a trained token, and a token that straddles a join is
trained whole: the answer's first token carries the space before it even where the template put
that space in the prompt (mplug_owl's ``"AI: "`` + ``"A"`` -> ``'ĠA'``, trained; where the trained
segment starts with the space, as in vicuna_v1's ``" {answer}</s>"``, the token lies inside it).
Templates write the end markers (EOS, ``<|endofchunk|>``) into their trained segments themselves;
added special tokens (``<image>``, ``<|endofchunk|>``, EOS) are split out by the tokenizer, so no
token crosses them.

Each ``<image>`` marker must come out as the single ``image_token`` (the builder adds it as a
special token); it is then repeated to the image's placeholder count. The offsets need a fast
(Rust) tokenizer; a slow one is an error, never a silent fallback to tokenising piece by piece.

Truncation to ``max_length`` never cuts through an image's tokens or an answer: it drops whole
in-context examples (``Sample.units``) from the front; a sample whose query alone is too long is
left out of the batch. Both are counted in :attr:`Collator.stats`.

``frame_keys=True`` adds each image frame's content hash (:func:`frame_key`) to the batch, the key
of the engine's feature cache (``run.cache_features``). :func:`split_by_length` cuts a right-padded
batch into passes over samples of similar length (``run.length_groups``), so fewer padded
positions run through the model; the per-token loss is unchanged.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from itertools import accumulate
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Preprocess, Sample

IGNORE = -100
#: the stand-in for a generation prompt's answer (a letter, as answers mostly start)
_ANSWER_PROBE = "A"


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


def frame_key(pixels: torch.Tensor) -> str:
    """The content hash of a preprocessed frame ``(3, S, S)``: BLAKE2b of its shape, dtype and
    bytes. Equal keys mean equal encoder inputs, whatever file, dataset or sample the image came
    from; any change of the image or of its preprocessing (size, resampling, mean, std) changes it."""
    value = pixels.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(f"{tuple(value.shape)}:{value.dtype};".encode(), digest_size=16)
    digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Collator:
    """``list[Sample]`` -> a batch dict.

    Returns ``input_ids, attention_mask, labels (B, L)``, ``vision_x (B, T_img, F, 3, S, S)``,
    ``media_mask (B, T_img)`` (True for real images) and ``ids`` (the sample ids). Every image of a
    batch has the same number of frames ``F`` (1 for still images; datasets are drawn one per batch).

    ``placeholder_tokens``: ``<image>`` tokens per image, an int or a function of the frame count.

    ``prompts``: the samples are generation prompts (a sample up to its answer, see
    :func:`~vlmkit.core.evaluation.generation.split_prompt`). A prompt must end on the tokens that
    precede the answer's first token in training, but a prompt that ends with whitespace (mplug_owl's
    ``"AI: "``) tokenises it as a token of its own, where the whole training text merges it into the
    answer (``'ĠA'``). So a prompt is tokenised with a stand-in answer letter after it, and the tokens
    that reach into the letter are dropped when the prompt's part of them is whitespace only: the
    prompt's ids are then exactly the training sample's ids before its first trained token.
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
    prompts: bool = False
    frame_keys: bool = False  # add "frame_keys": one content hash per real frame (the feature cache's keys)

    def __post_init__(self) -> None:
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        if self.padding_side not in {"left", "right"}:
            raise ValueError("padding_side must be 'left' or 'right'")

    def _placeholders(self, frames: int) -> int:
        p = self.placeholder_tokens
        return p(frames) if callable(p) else p

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Token ids and labels of a sample, without truncation: the whole text tokenised once,
        labels from the trained segments' character spans."""
        tok = self.tokenizer
        ids: list[int] = []
        labels: list[int] = []
        text = "".join(t for t, _ in sample.segments)
        if self.add_bos and tok.bos_token_id is not None and not (tok.bos_token and text.startswith(tok.bos_token)):
            ids.append(tok.bos_token_id)  # unless the template's text already starts with it (chat templates)
            labels.append(IGNORE)
        images = list(sample.images)
        markers = text.count(self.image_token)
        if markers != len(images):
            raise VlmkitError(
                f"sample '{sample.id}': its text has {markers} {self.image_token} markers but it has "
                f"{len(images)} images"
            )
        if not text:
            return ids, labels
        token_ids, offsets = self._prompt_tokens(text) if self.prompts else self._tokenize(text)
        trained = self._trained_chars(sample.segments, len(text))
        n_images = 0
        for token_id, (start, end) in zip(token_ids, offsets):
            if token_id == self.image_token_id:
                if text[start:end] != self.image_token:
                    raise VlmkitError(
                        f"sample '{sample.id}': the tokenizer produced the {self.image_token} token for "
                        f"{text[start:end]!r}, not for a marker"
                    )
                n = self._placeholders(len(_frames(images[n_images])))
                ids.extend([self.image_token_id] * n)
                labels.extend([IGNORE] * n)
                n_images += 1
                continue
            ids.append(token_id)
            # trained iff one of its characters is (an empty span: the character it sits at)
            labels.append(token_id if trained[start] < trained[max(end, start + 1)] else IGNORE)
        if n_images != len(images):
            raise VlmkitError(
                f"sample '{sample.id}': the tokenizer did not keep {self.image_token} as one token "
                f"({n_images} of {len(images)} markers); add it to the tokenizer as a special token"
            )
        return ids, labels

    def _prompt_tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """A generation prompt's tokens: those of ``text`` followed by a stand-in answer, up to the
        first token that reaches into it, if what those tokens hold of ``text`` is whitespace."""
        token_ids, offsets = self._tokenize(text + _ANSWER_PROBE)
        keep = next((k for k, (_, end) in enumerate(offsets) if end > len(text)), len(offsets))
        cut = min([len(text), *(start for start, _ in offsets[keep:])])
        if text[cut:].strip():  # the stand-in merged with the prompt's own text: tokenise it alone
            return self._tokenize(text)
        return token_ids[:keep], offsets[:keep]

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``text``'s token ids and each token's character span, without added BOS/EOS."""
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise VlmkitError(
                f"the collator needs a fast tokenizer (character offsets of tokens) to tokenise a sample's text "
                f"once and mask it by character spans; {type(tok).__name__} is not one (load the decoder's "
                "tokenizer with use_fast=True, or convert it)"
            )
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @staticmethod
    def _trained_chars(segments: list[tuple[str, bool]], length: int) -> list[int]:
        """Prefix counts of trained characters: ``c[j] - c[i]`` trained characters lie in ``[i, j)``."""
        flags: list[int] = []
        for seg_text, seg_trained in segments:
            flags.extend([int(seg_trained)] * len(seg_text))
        counts = [0, *accumulate(flags)]
        return counts + [counts[-1]]  # an empty span at the very end

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
        keys: list[str] = []
        for b, s in enumerate(samples):
            for t, image in enumerate(s.images):
                for f, frame in enumerate(_frames(image)):
                    pixels = image_to_tensor(frame, self.preprocess)
                    vision_x[b, t, f] = pixels
                    if self.frame_keys:
                        keys.append(frame_key(pixels))
                media_mask[b, t] = True
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "vision_x": vision_x,
            "media_mask": media_mask,
            "ids": [s.id for s in samples],
        }
        if self.frame_keys:
            batch["frame_keys"] = keys  # in vision_x[media_mask].flatten(0, 1) order
        return batch


# ------------------------------------------------------------------------------ length groups
def length_groups(lengths: list[int], max_groups: int, min_saving: float = 0.05) -> list[list[int]]:
    """Sample indices in at most ``max_groups`` groups of similar length: sorted by length and
    cut where the padded positions (each group padded to its longest sample) are fewest. A group
    is only added where it saves at least ``min_saving`` of the whole batch's padded positions
    (``len(lengths) * max(lengths)``), since every group is another pass through the model."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    ordered = [lengths[i] for i in order]
    n = len(ordered)
    threshold = min_saving * n * (max(ordered) if ordered else 0)
    # best[g][j]: fewest positions covering the first j sorted samples in g groups; a group
    # (i, j] costs (j - i) * ordered[j - 1], its longest sample's length
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                cost = best[g - 1][i] + (j - i) * ordered[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    groups = 1
    for g in range(2, max_groups + 1):  # another pass only where it saves enough
        if best[groups][n] - best[g][n] >= threshold * (g - groups) and best[g][n] < best[groups][n]:
            groups = g
    bounds, j = [], n
    for g in range(groups, 0, -1):
        i = cut[g][j]
        bounds.append((i, j))
        j = i
    return [[order[k] for k in range(i, j)] for i, j in reversed(bounds)]


def split_by_length(batch: dict[str, Any], max_groups: int, min_saving: float = 0.05) -> list[dict[str, Any]]:
    """A right-padded training batch as at most ``max_groups`` batches of samples of similar
    length (:func:`length_groups`), each cut to its own longest sample and its own image count.

    Each sample keeps its tokens, labels, attention mask, images and frame keys; only padding is
    dropped. Summing the token losses over the parts gives the batch's sum (the engine divides by
    the global count of trained tokens either way), so a step's loss and gradients are the same
    as for the whole batch, up to the order of floating-point sums."""
    mask = batch["attention_mask"]
    if max_groups <= 1 or mask.shape[0] < 2:
        return [batch]
    if bool(mask[:, 0].eq(0).any()):
        raise ValueError("split_by_length needs right padding (every sample's tokens first)")
    lengths = [int(n) for n in mask.sum(1)]
    groups = length_groups(lengths, max_groups, min_saving)
    if len(groups) == 1:
        return [batch]
    media_mask = batch["media_mask"]
    frames = batch["vision_x"].shape[2]
    per_sample = [int(n) * frames for n in media_mask.sum(1)]
    starts = [0, *accumulate(per_sample)]
    parts = []
    for rows in groups:
        index = torch.tensor(rows, dtype=torch.long)
        length = max(lengths[r] for r in rows)
        t_img = max(1, max(int(media_mask[r].sum()) for r in rows))
        part = {
            "input_ids": batch["input_ids"][index, :length],
            "attention_mask": mask[index, :length],
            "labels": batch["labels"][index, :length],
            "vision_x": batch["vision_x"][index, :t_img],
            "media_mask": media_mask[index, :t_img],
            "ids": [batch["ids"][r] for r in rows],
        }
        if "frame_keys" in batch:
            part["frame_keys"] = [k for r in rows for k in batch["frame_keys"][starts[r] : starts[r + 1]]]
        parts.append(part)
    return parts
