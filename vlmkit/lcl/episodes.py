"""``lcl``: link-context learning episodes from a class-folder image set (REFERENCE 1.5).

An episode is 2-way: ``k`` pictures of a positive class, called by an invented word, and ``k`` of a
hard-negative class with its real name, shuffled as in-context examples; then a query picture of
either class, whose answer is that class's name. Rendered by the ``lcl`` template, only the final
answer is trained. "16 shots" means 8 pictures per class, as in the paper; shot counts are even.

Classes are the sub-folders of ``root`` (``_`` in a folder name reads as a space). The hard negative
is either fixed by a ``pairs`` file (``{positive: negative}``, the held-out ISEKAI-style setting,
where positives already carry invented names) or drawn from the positive's similarity ranking
(:mod:`vlmkit.lcl.neighbours`).

Strategies (``strategy``, REFERENCE 1.5), how many shots an episode has. A shot count ``m`` is the
number of support pictures, both classes together (the paper's "16-shot" = 8 per class), so the
allowed counts are the even numbers ``min_shots, min_shots + 2, ..., max_shots`` (2, 4, ..., 16):

- ``2way``: always ``shots`` (the paper's [2-way]: a fixed 16);
- ``2way_random``: ``m`` uniform over the allowed counts;
- ``2way_weight``: ``m`` with probability ``p_m = e^m / sum_m' e^m'`` over the allowed counts, so
  each count is ``e^2`` times as likely as the one below it (p_16 = 0.865, p_14 = 0.117 for 2..16);
  the reference code instead weights the per-class count ``j = m / 2`` by ``e^(j/2)``;
- ``mix``: the [2-way] task, always ``shots``; the stage mixes these episodes evenly with the
  model's original instruction data (``stages.N.mix: even`` or equal per-step counts, checked when
  the recipe loads).

The paper's [2-way-random] and [2-way-weight] train [2-way] first and then go on with the varied
counts: two stages, one on a ``2way`` dataset and one on a ``2way_random`` / ``2way_weight`` one
(the ``lcl_repro`` recipe's paper profile).

Episode ``i`` is a function of ``(seed, i)`` alone; queries alternate between the positive (even
``i``) and the negative class (odd ``i``), so both answers are equally frequent.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from vlmkit.lcl.neighbours import NeighboursConfig, class_embeddings, draw_negative, ranked_intervals, similarity_matrix
from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.lcl.synthetic_concepts import invented_word
from vlmkit.core.data.images import ImageDecodeError, read_image_file
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Dataset, DatasetConfig
from vlmkit.datasets.class_folders import IMAGE_SUFFIXES, QUESTION, display_name

STRATEGIES = ("2way", "2way_random", "2way_weight", "mix")


class LCLEpisodesConfig(DatasetConfig):
    root: str
    """A folder of class folders, each holding that class's pictures."""
    classes: list[str] | None = None
    """Only these class folders (default: all)."""
    pairs: str | None = None
    """A JSON file ``{positive class: negative class}`` fixing each positive's hard negative (the
    positives are then exactly its keys); default: negatives drawn from the similarity ranking."""
    rename: bool | None = None
    """Call the positive by an invented word (default: yes without ``pairs``, no with them)."""
    strategy: Literal["2way", "2way_random", "2way_weight", "mix"] = "2way_random"
    shots: PositiveInt = 16
    """``2way`` and ``mix``: support pictures per episode, both classes together (even)."""
    min_shots: PositiveInt = 2
    max_shots: PositiveInt = 16
    """``2way_random`` and ``2way_weight``: the range of support pictures (even counts)."""
    num_episodes: PositiveInt = 1000
    """Episodes in one pass (each drawn afresh from the seed and its index)."""
    seed: int = 0
    name_letters: tuple[int, int] = (3, 8)
    """Length range of invented names (the paper: 1-10 letters; very short names match inside other
    words, so 3 is the default minimum)."""
    neighbours: NeighboursConfig = NeighboursConfig()

    @model_validator(mode="after")
    def _check(self) -> "LCLEpisodesConfig":
        for name in ("shots", "min_shots", "max_shots"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name}: {getattr(self, name)} is odd; shots count both classes, so they are even")
        if self.min_shots > self.max_shots:
            raise ValueError(f"min_shots {self.min_shots} > max_shots {self.max_shots}")
        lo, hi = self.name_letters
        if not 1 <= lo <= hi:
            raise ValueError(f"name_letters: need 1 <= min <= max, got {self.name_letters}")
        return self


@dataclass
class Episode:
    """One episode: its record (support then query), the two names and the query's true class."""

    record: Record
    positive: str
    negative: str
    answer: str
    other: str
    support_labels: list[str] = field(default_factory=list)
    support_truth: list[str] = field(default_factory=list)
    positive_class: str = ""
    negative_class: str = ""
    negative_interval: int | None = None
    """The similarity interval (1 = most similar) the negative was drawn from; None with pairs."""


def shot_distribution(strategy: str, shots: int, min_shots: int, max_shots: int) -> dict[int, float]:
    """Support size (both classes together) -> probability for a strategy (see the module doc)."""
    if strategy in ("2way", "mix"):
        return {shots: 1.0}
    counts = list(range(min_shots, max_shots + 1, 2))
    if strategy == "2way_random":
        return {c: 1 / len(counts) for c in counts}
    if strategy == "2way_weight":
        w = [math.exp(c - max_shots) for c in counts]  # e^m, scaled by e^-max against overflow
        return {c: x / sum(w) for c, x in zip(counts, w)}
    raise VlmkitError(f"lcl: strategy '{strategy}' unknown; allowed: {', '.join(STRATEGIES)}")


class LCLEpisodes(Dataset):
    """Link-context 2-way episodes from class folders (invented names, hard negatives)."""

    Config = LCLEpisodesConfig

    def __init__(self, config: LCLEpisodesConfig, where: str | None = None):
        from vlmkit.core.data.build import current_where

        super().__init__(config)
        self.where = where = where or current_where() or "lcl dataset"
        root = Path(config.root).expanduser()
        if not root.is_dir():
            raise VlmkitError(f"{where}.root: '{root}' is not a folder of class folders")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if config.classes is not None:
            known = {p.name for p in folders}
            missing = [c for c in config.classes if c not in known]
            if missing:
                raise VlmkitError(f"{where}.classes: no folder {', '.join(repr(m) for m in missing)} in '{root}'")
            folders = [root / c for c in config.classes]
        self.root = root
        self.classes = [p.name for p in folders]
        self.files = {p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for p in folders}
        need = max(config.shots, config.max_shots) // 2 + 1
        short = [c for c, fs in self.files.items() if len(fs) < need]
        if short:
            raise VlmkitError(
                f"{where}.root: class folder(s) {', '.join(repr(c) for c in short[:5])} of '{root}' hold fewer than "
                f"{need} pictures ({max(config.shots, config.max_shots)} shots need {need - 1} per class plus a query)"
            )
        self.pairs: dict[str, str] | None = None
        if config.pairs is not None:
            self.pairs = self._read_pairs(Path(config.pairs).expanduser())
        elif len(self.classes) < 2:
            raise VlmkitError(f"{where}.root: '{root}' needs at least two class folders for 2-way episodes")
        self.rename = config.rename if config.rename is not None else self.pairs is None
        self.shot_probs = shot_distribution(config.strategy, config.shots, config.min_shots, config.max_shots)
        self._taken = {w for c in self.classes for w in display_name(c).lower().split()}

    def _read_pairs(self, path: Path) -> dict[str, str]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VlmkitError(f"{self.where}.pairs: '{path}' does not exist") from None
        except (OSError, ValueError) as exc:
            raise VlmkitError(f"{self.where}.pairs: '{path}' is not readable JSON: {exc}") from None
        if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise VlmkitError(f"{self.where}.pairs: '{path}' must be a non-empty JSON object of positive class -> negative class")
        unknown = sorted({c for kv in data.items() for c in kv} - set(self.classes))
        if unknown:
            raise VlmkitError(f"{self.where}.pairs: '{path}' names class(es) with no folder in '{self.root}': {', '.join(unknown[:5])}")
        return data

    # ------------------------------------------------------------------------ hard negatives
    @cached_property
    def intervals(self) -> list[list[list[int]]]:
        """Per class, the other classes ranked by similarity and cut into intervals."""
        cfg = self.config.neighbours
        loaders = [[(lambda f=f: self._media(f).frames[0]) for f in self.files[c]] for c in self.classes]
        image, text = class_embeddings(cfg, [display_name(c) for c in self.classes], loaders, where=self.where,
                                       cache_key=str(self.root))
        sim = similarity_matrix(image, text, cfg.weights)
        return [ranked_intervals(sim, a, cfg.intervals) for a in range(len(self.classes))]

    # ------------------------------------------------------------------------------ episodes
    def __len__(self) -> int:
        return self.config.num_episodes

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.episode(index).record

    def draw_shots(self, rng: random.Random) -> int:
        counts = list(self.shot_probs)
        return rng.choices(counts, weights=[self.shot_probs[c] for c in counts])[0]

    def _invented(self, rng: random.Random, avoid: str) -> str:
        while True:
            word = invented_word(rng, self.config.name_letters)
            if word not in self._taken and word not in avoid.lower() and avoid.lower() not in word:
                return word

    def episode(
        self,
        index: int,
        *,
        shots: int | None = None,
        swapped: frozenset[int] | set[int] = frozenset(),
        seed: int | None = None,
    ) -> Episode:
        """Episode ``index``; ``shots`` overrides the strategy's draw; the support examples at the
        positions in ``swapped`` (0-based, after shuffling) show the other class's name."""
        cfg = self.config
        rng = random.Random(f"lcl:{cfg.seed if seed is None else seed}:{index}")
        if self.pairs is not None:
            keys = sorted(self.pairs)
            pos = keys[rng.randrange(len(keys))]
            neg = self.pairs[pos]
            interval = None
        else:
            a = rng.randrange(len(self.classes))
            b, interval = draw_negative(self.intervals[a], rng)
            pos, neg = self.classes[a], self.classes[b]
        k = shots if shots is not None else self.draw_shots(rng)
        if k % 2 or k < 2:
            raise VlmkitError(f"lcl: {k} shots: shot counts are even and at least 2 (both classes, k/2 each)")
        per = k // 2
        neg_name = display_name(neg)
        pos_name = self._invented(rng, neg_name) if self.rename else display_name(pos)
        query_positive = index % 2 == 0
        pos_files = rng.sample(self.files[pos], per + (1 if query_positive else 0))
        neg_files = rng.sample(self.files[neg], per + (0 if query_positive else 1))
        query_file = (pos_files if query_positive else neg_files).pop()
        support = [(f, pos_name) for f in pos_files] + [(f, neg_name) for f in neg_files]
        rng.shuffle(support)
        truth = [name for _, name in support]
        labels = [(neg_name if name == pos_name else pos_name) if i in swapped else name for i, name in enumerate(truth)]
        answer, other = (pos_name, neg_name) if query_positive else (neg_name, pos_name)
        context = [Exchange([Turn("user", QUESTION), Turn("assistant", label)], media=[self._media(f)], id=f"ex{i}")
                   for i, ((f, _), label) in enumerate(zip(support, labels))]
        query = Exchange([Turn("user", QUESTION), Turn("assistant", answer)], media=[self._media(query_file)], id="query")
        record = Record(id=f"lcl-{index:06d}", query=query, context=context)
        return Episode(record, pos_name, neg_name, answer, other, labels, truth, pos, neg, interval)

    def _media(self, file: Path) -> Media:
        try:
            image = read_image_file(file)
        except (OSError, ImageDecodeError) as exc:
            raise VlmkitError(f"{self.where}: picture '{file}' cannot be read: {getattr(exc, 'reason', exc)}") from None
        return Media(str(file.relative_to(self.root)), [image])


def mentions(text: str, name: str) -> bool:
    """``name`` appears in ``text`` as whole words (case-insensitive)."""
    return re.search(r"(?<![a-z0-9])" + re.escape(name.lower()) + r"(?![a-z0-9])", text.lower()) is not None


def string_match(prediction: str, answer: str, other: str) -> bool:
    """The reference's scoring: right when the true name is mentioned and the other one is not."""
    return mentions(prediction, answer) and not mentions(prediction, other)
