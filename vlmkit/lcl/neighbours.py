"""Hard negatives for link-context episodes: classes ranked by similarity, drawn by interval.

REFERENCE 1.5: the similarity of two classes a, b is a weighted sum of cosine similarities of
their class-name text embeddings ``t`` and mean image features ``v``::

    s(a, b) = w_tt cos(t_a, t_b) + w_it (cos(v_a, t_b) + cos(t_a, v_b)) + w_ii cos(v_a, v_b)

(the paper's weights: 0.5, 0.8, 0.5; the image-text term is the sum of both directions, not their
mean, as the reference code computes it). The other classes, ranked by ``s`` from the most similar,
are cut into ``N`` contiguous intervals; an episode draws interval ``j`` (1-based) with probability
proportional to ``N + 1 - j`` and one class uniformly inside it. With fewer classes than ``N`` every
class is its own interval.

The embeddings come from models a recipe names: any registered encoder (image features, mean over
tokens and over ``images_per_class`` pictures of the class) and any registered decoder (a name's
embedding: the mean input-embedding row of its tokens). The image-text term needs both in one
joint space of one width (a CLIP-like model); with other models its weight must be 0.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from vlmkit.core.errors import VlmkitError


class SimilarityWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_text: float = Field(0.5, ge=0)
    image_text: float = Field(0.8, ge=0)
    image_image: float = Field(0.5, ge=0)


class NeighboursConfig(BaseModel):
    """How hard negatives are ranked and drawn (a ``neighbours:`` section of an ``lcl`` dataset)."""

    model_config = ConfigDict(extra="forbid")

    intervals: PositiveInt = 36
    """N: the ranking is cut into this many intervals (paper 100, reference code 36)."""
    weights: SimilarityWeights = SimilarityWeights()
    """Weights of the text-text, image-text and image-image cosine similarities."""
    image_encoder: dict[str, Any] | None = None
    """A registered encoder ``{name: ..., <options>}`` whose mean features represent a class's images."""
    text_decoder: dict[str, Any] | None = None
    """A registered decoder ``{name: ..., <options>}`` whose token embeddings represent a class name."""
    images_per_class: PositiveInt = 4
    """Pictures per class averaged into its image feature."""


def similarity_matrix(
    image: torch.Tensor | None, text: torch.Tensor | None, weights: SimilarityWeights
) -> torch.Tensor:
    """``image (C, d_v)``, ``text (C, d_t)`` class embeddings -> ``s (C, C)`` (see module doc)."""
    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.normalize(a.double(), dim=-1)
        b = torch.nn.functional.normalize(b.double(), dim=-1)
        return a @ b.T

    ref = image if image is not None else text
    if ref is None:
        raise VlmkitError("neighbours: no image or text embeddings to rank classes by")
    sim = torch.zeros(ref.shape[0], ref.shape[0], dtype=torch.float64)
    if weights.text_text:
        if text is None:
            raise VlmkitError("neighbours.weights.text_text > 0 needs neighbours.text_decoder (name embeddings)")
        sim += weights.text_text * cos(text, text)
    if weights.image_image:
        if image is None:
            raise VlmkitError("neighbours.weights.image_image > 0 needs neighbours.image_encoder (image features)")
        sim += weights.image_image * cos(image, image)
    if weights.image_text:
        if image is None or text is None or image.shape[-1] != text.shape[-1]:
            raise VlmkitError(
                "neighbours.weights.image_text > 0 needs image and text embeddings of one joint space (one width, "
                "e.g. CLIP's); these models do not share one: set it to 0"
            )
        it = cos(image, text)
        sim += weights.image_text * (it + it.T)
    return sim


def ranked_intervals(similarity: torch.Tensor, anchor: int, intervals: int) -> list[list[int]]:
    """The classes other than ``anchor``, most similar first, cut into ``min(intervals, C - 1)``
    contiguous intervals of near-equal size."""
    order = [int(i) for i in torch.argsort(similarity[anchor], descending=True, stable=True) if int(i) != anchor]
    n = min(intervals, len(order))
    if n == 0:
        raise VlmkitError("neighbours: a link-context episode needs at least two classes")
    size, extra = divmod(len(order), n)
    out, start = [], 0
    for j in range(n):
        end = start + size + (1 if j < extra else 0)
        out.append(order[start:end])
        start = end
    return out


def interval_probabilities(n: int) -> list[float]:
    """p(j) for j = 1..n, proportional to n + 1 - j."""
    total = n * (n + 1) / 2
    return [(n + 1 - j) / total for j in range(1, n + 1)]


def draw_negative(intervals: list[list[int]], rng: random.Random) -> tuple[int, int]:
    """(the drawn class, its interval j, 1-based): interval j with p ~ N + 1 - j, a class uniformly in it."""
    n = len(intervals)
    j = rng.choices(range(1, n + 1), weights=[n + 1 - k for k in range(1, n + 1)])[0]
    return rng.choice(intervals[j - 1]), j


def _build(kind: str, spec: dict[str, Any], where: str) -> Any:
    from vlmkit.core.registry import get_registry

    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise VlmkitError(f"{where}: needs a 'name' (a registered {kind})")
    registry = get_registry()
    cls = registry.component_class(kind, name)
    try:
        config = cls.Config(**spec)
    except Exception as exc:  # pydantic ValidationError: name the section
        raise VlmkitError(f"{where}: {exc}") from None
    from vlmkit.core.interfaces import BuildContext

    return cls.build(config, BuildContext())  # constructed, then its weights read


def class_embeddings(
    config: NeighboursConfig, names: list[str], images: list[list[Any]], *, where: str, cache_key: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(image ``(C, d_v)`` or None, text ``(C, d_t)`` or None) for the classes ``names`` with their
    picture loaders ``images`` (callables returning PIL images); cached on disk by ``cache_key``."""
    from vlmkit.demo.data import cache_root

    digest = hashlib.sha256(json.dumps([cache_key, names, config.model_dump()], sort_keys=True, default=str).encode()).hexdigest()[:20]
    file = cache_root() / "lcl-neighbours" / f"{digest}.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        return tensors.get("image"), tensors.get("text")
    image = text = None
    with torch.no_grad():
        if config.image_encoder is not None:
            encoder = _build("encoder", config.image_encoder, f"{where}.neighbours.image_encoder").eval()
            from vlmkit.core.data.collate import image_to_tensor

            pre = encoder.preprocess
            feats = []
            for loaders in images:
                pix = torch.stack([image_to_tensor(load(), pre) for load in loaders[: config.images_per_class]])
                feats.append(encoder(pix).mean(dim=(0, 1)))
            image = torch.stack(feats).float()
        if config.text_decoder is not None:
            decoder = _build("decoder", config.text_decoder, f"{where}.neighbours.text_decoder").eval()
            table = decoder.get_input_embeddings().weight
            rows = []
            for name in names:
                ids = decoder.tokenizer(name, add_special_tokens=False)["input_ids"]
                rows.append(table[torch.tensor(ids)].float().mean(0))
            text = torch.stack(rows)
    from safetensors.torch import save_file

    from vlmkit.core.checkpoint import atomic_file

    tensors = {k: v.contiguous() for k, v in (("image", image), ("text", text)) if v is not None}
    with atomic_file(file) as tmp:
        save_file(tensors, str(tmp))
    return image, text
