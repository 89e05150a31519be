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


# ------------------------------------------------------------------------------------------- VQA
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_COMMA_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def vqa_normalize(text: str) -> str:
    """The VQA benchmark's answer normalisation, in short: lower case, punctuation out (a decimal
    point and a thousands comma stay numbers), number words to digits, articles out."""
    text = _COMMA_NUMBER.sub("", text.lower().replace("\n", " ").replace("\t", " ").strip())
    text = _PERIOD.sub("", text)
    text = re.sub(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:']", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: with the benchmark's 10 human answers, the mean over the 10 leave-one-out
    subsets of ``min(1, matches / 3)``; with fewer answers (a single reference), ``min(1, matches /
    min(3, len(answers)))``, so one reference scores as exact match after normalisation."""
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(a) for a in answers]
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(refs) < 10:
        return min(1.0, sum(r == pred for r in refs) / min(3, len(refs)))
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------------------- CIDEr
def _ngrams(words: list[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        key = tuple(words[i:i + n])
        counts[key] = counts.get(key, 0) + 1
    return counts


def cider_d(predictions: dict[str, str], references: dict[str, list[str]], *, n: int = 4, sigma: float = 6.0) -> tuple[float, dict[str, float]]:
    """CIDEr-D (Vedantam et al. 2015, the COCO caption evaluation's ``Cider``): corpus mean and per-item scores.

    Captions are split on whitespace (tokenise and lower-case them first). For each n-gram order
    1..n, a caption's vector holds ``count * log(N / df)`` (``df``: how many items' references
    contain the n-gram, ``N``: items); the score of a prediction against one reference is the sum of
    ``min(pred, ref) * ref`` over n-grams divided by both norms, times ``exp(-(len_pred - len_ref)^2 /
    (2 sigma^2))``; orders are averaged, references averaged, and the result scaled by 10."""
    import math

    ids = list(predictions)
    if not ids or set(ids) != set(references):
        raise ValueError("cider_d: predictions and references must cover the same, non-empty set of ids")
    doc_freq: dict[tuple[str, ...], int] = {}
    for item in ids:
        seen: set[tuple[str, ...]] = set()
        for ref in references[item]:
            words = ref.split()
            for k in range(1, n + 1):
                seen.update(_ngrams(words, k))
        for gram in seen:
            doc_freq[gram] = doc_freq.get(gram, 0) + 1
    log_n = math.log(float(len(ids)))

    def vector(text: str) -> tuple[list[dict], list[float], int]:
        words = text.split()
        vecs, norms = [], []
        for k in range(1, n + 1):
            vec = {g: c * (log_n - math.log(max(1.0, doc_freq.get(g, 0.0)))) for g, c in _ngrams(words, k).items()}
            vecs.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vecs, norms, len(words)

    scores: dict[str, float] = {}
    for item in ids:
        hyp, hyp_norm, hyp_len = vector(predictions[item])
        total = [0.0] * n
        for ref_text in references[item]:
            ref, ref_norm, ref_len = vector(ref_text)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(v, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0) for g, v in hyp[k].items())
                if hyp_norm[k] and ref_norm[k]:
                    total[k] += dot / (hyp_norm[k] * ref_norm[k]) * penalty
        scores[item] = 10.0 * sum(total) / n / len(references[item])
    return sum(scores.values()) / len(scores), scores


def caption_tokens(text: str) -> str:
    """Lower case, punctuation out, single spaces: what :func:`cider_d` expects."""
    return normalize(text)
