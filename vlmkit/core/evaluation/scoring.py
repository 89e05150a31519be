"""Scorers of generated answers against references."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: ``" Red."`` -> ``"red"``."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def exact_match(prediction: str, reference: str) -> bool:
    """The prediction is the reference, up to case, punctuation and spacing."""
    return normalize(prediction) == normalize(reference)
