"""Quality filters of parsed pairs. Each rejected pair is kept (in the rejects file) with its reason:

- ``empty``: no instruction or no answer;
- ``too_short`` / ``too_long``: word counts outside the limits;
- ``ungrounded``: the pair names an object word (a word of any annotation label in the whole input)
  that this item's labels and captions do not contain, e.g. "triangle" for a scene without one;
- ``duplicate``: the same instruction and answer (normalised) as an earlier pair;
- ``near_duplicate``: an instruction at least ``near_duplicate`` similar (difflib ratio of the
  normalised texts) to an earlier instruction of the same item (kept or not)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from vlmkit.syphus.annotations import Annotation

__all__ = ["FilterConfig", "PairFilter", "words"]

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
#: words of labels that never make a pair ungrounded (too general to be an object)
_GENERAL = frozenset({"a", "an", "the", "of", "and", "object", "thing", "shape", "shapes", "left", "right", "top",
                      "bottom", "middle", "small", "large", "big"})


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_instruction_words: int = Field(3, ge=1)
    max_instruction_words: int = Field(60, ge=1)
    min_answer_words: int = Field(1, ge=1)
    max_answer_words: int = Field(250, ge=1)
    grounding: bool = True
    """Reject pairs naming label words absent from the item's annotations."""
    near_duplicate: float = Field(0.9, gt=0, le=1)
    """Instruction similarity (0..1) within an item at which a later pair is a near-duplicate."""


@dataclass
class PairFilter:
    config: FilterConfig
    vocabulary: frozenset[str]
    seen: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def for_annotations(cls, config: FilterConfig, annotations: list[Annotation]) -> "PairFilter":
        vocab = {_singular(w) for ann in annotations for label in ann.labels() for w in words(label)}
        return cls(config, frozenset(vocab - _GENERAL))

    def check_item(self, ann: Annotation, pairs: list[tuple[str, str]]) -> list[str | None]:
        """A reason per pair (None: kept), judged in order; kept pairs are remembered for duplicates."""
        c = self.config
        present = {_singular(w) for text in [*ann.labels(), *ann.captions] for w in words(text)}
        earlier: list[str] = []
        reasons: list[str | None] = []
        for instruction, answer in pairs:
            qi, aw = words(instruction), words(answer)
            norm_q, norm_a = " ".join(qi), " ".join(aw)
            reason = None
            if not instruction.strip() or not answer.strip():
                reason = "empty"
            elif len(qi) < c.min_instruction_words or len(aw) < c.min_answer_words:
                reason = "too_short"
            elif len(qi) > c.max_instruction_words or len(aw) > c.max_answer_words:
                reason = "too_long"
            elif c.grounding and any(_singular(w) in self.vocabulary and _singular(w) not in present for w in qi + aw):
                reason = "ungrounded"
            elif (norm_q, norm_a) in self.seen:
                reason = "duplicate"
            elif any(difflib.SequenceMatcher(None, norm_q, k).ratio() >= c.near_duplicate for k in earlier):
                reason = "near_duplicate"
            if reason is None:
                self.seen.add((norm_q, norm_a))
            earlier.append(norm_q)
            reasons.append(reason)
        return reasons

    def ungrounded_words(self, ann: Annotation, text: str) -> list[str]:
        present = {_singular(w) for t in [*ann.labels(), *ann.captions] for w in words(t)}
        return sorted({w for w in words(text) if _singular(w) in self.vocabulary and _singular(w) not in present})
