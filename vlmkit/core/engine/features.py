"""The frozen encoder's features, computed once per image and kept in memory (``run.cache_features``).

A stage that keeps the encoder frozen (and so in eval mode) gets the same features for the same
preprocessed pixels every time it sees an image; the demo stages see each image several times. The
cache maps a frame's key to the encoder's output for that frame:

- **Key**: the collator's content hash of the frame's preprocessed pixel tensor
  (:func:`vlmkit.core.data.collate.frame_key`: BLAKE2b of its shape, dtype and bytes), so the
  image's identity and its preprocessing (size, resampling, mean and std) are both in it, whatever
  dataset or file the image came from; plus the autocast dtype the encoder runs in.
- **Encoder state**: :meth:`FeatureCache.bind` is called when a stage starts with a fingerprint of
  the encoder's weights and buffers; a different fingerprint (a stage trained the encoder, an
  ``init_from`` loaded one) empties the cache, so a feature is never served for other weights.
- **Use**: only where the encoder is frozen and in eval mode. The model checks both at every call
  and encodes without the cache otherwise (counted as ``bypassed``); the engine does not pass the
  cache to a stage that trains the encoder and says so.
- **Memory**: least-recently-used entries are dropped beyond ``limit_bytes``
  (``run.feature_cache_mib``); :meth:`stats` reports hits, misses, evictions and the size held.

Nothing is stored on a module: the engine owns the cache and passes it with the batch's frame keys
to :meth:`vlmkit.core.compose.VisionLanguageModel.forward`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def encoder_fingerprint(encoder: nn.Module) -> str:
    """BLAKE2b of every parameter and buffer of ``encoder`` (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]:
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """In-memory, size-bounded map from frame key to the frozen encoder's ``(tokens, width)``
    output for that frame (LRU eviction)."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.fingerprint: str | None = None
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bypassed = 0  # frames encoded without the cache (encoder training or in train mode)
        self.resets = 0  # times bind() emptied it for other encoder weights

    def __len__(self) -> int:
        return len(self._store)

    def bind(self, fingerprint: str) -> bool:
        """Use the cache for the encoder state ``fingerprint``; empties it if that differs from the
        state its entries were computed with. Returns whether entries were dropped."""
        emptied = False
        if fingerprint != self.fingerprint:
            emptied = bool(self._store)
            self.clear()
            self.resets += int(emptied)
        self.fingerprint = fingerprint
        return emptied

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "bypassed": self.bypassed,
                "entries": len(self._store), "bytes": self.bytes, "limit_bytes": self.limit_bytes}

    def encode(self, encode: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """``frames (N, C, H, W)`` with one key each -> ``(N, tokens, width)``: cached features
        where the key is held, ``encode`` (the frozen encoder, under no_grad) on the others, each
        distinct missing frame once; the new features are stored."""
        if len(keys) != frames.shape[0]:
            raise ValueError(f"{frames.shape[0]} frames but {len(keys)} frame keys")
        tag = _autocast_tag(frames.device)
        found: dict[int, torch.Tensor] = {}
        missing: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(keys):
            full = (key, tag)
            value = self._store.get(full)
            if value is not None:
                self._store.move_to_end(full)
                found[i] = value
                self.hits += 1
            else:
                if full in missing:
                    self.hits += 1  # the same frame twice in one batch: encoded once
                else:
                    self.misses += 1
                missing.setdefault(full, []).append(i)
        if missing:
            firsts = [positions[0] for positions in missing.values()]
            with torch.no_grad():
                fresh = encode(frames[firsts])
            for (full, positions), feat in zip(missing.items(), fresh):
                for i in positions:
                    found[i] = feat
                self._put(full, feat.clone())  # its own storage: the batch's tensor is not kept alive
        return torch.stack([found[i] for i in range(len(keys))])

    def _put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.limit_bytes:
            return
        self._store[key] = value
        self.bytes += size
        while self.bytes > self.limit_bytes:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1


def _autocast_tag(device: torch.device) -> str:
    """The dtype the encoder computes in under the current autocast (part of the key)."""
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return str(torch.get_autocast_dtype(kind)).removeprefix("torch.")
    return "none"


def describe(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """The counts of one stage (``after - before``) with the cache's size now."""
    out: dict[str, Any] = {k: after[k] - before[k] for k in ("hits", "misses", "evictions", "bypassed")}
    out.update(entries=after["entries"], bytes=after["bytes"], limit_bytes=after["limit_bytes"])
    looked_up = out["hits"] + out["misses"]
    out["hit_rate"] = out["hits"] / looked_up if looked_up else 0.0
    return out
