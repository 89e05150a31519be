"""Link-context learning data: the synthetic concepts, the episode builder (balance, shot counts,
strategies, swapped labels), the similarity ranking and the N+1-j law of hard negatives."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlmkit.lcl.episodes import LCLEpisodes, LCLEpisodesConfig, shot_distribution
from vlmkit.lcl.neighbours import (
    SimilarityWeights,
    draw_negative,
    interval_probabilities,
    ranked_intervals,
    similarity_matrix,
)
from vlmkit.lcl.synthetic_concepts import write_concepts
from vlmkit.core.errors import VlmkitError


@pytest.fixture(scope="module")
def concepts(tmp_path_factory) -> Path:
    return write_concepts(tmp_path_factory.mktemp("concepts"), seed=3, train_composites=6, heldout_concepts=4,
                          train_images=10, heldout_images=10, image_size=32)


def _ranked_config(root: Path, **kw) -> LCLEpisodesConfig:
    return LCLEpisodesConfig(root=str(root), **kw)


class _FixedSimilarity(LCLEpisodes):
    """Episodes whose ranking comes from a given similarity matrix (no models)."""

    similarity: torch.Tensor

    @property
    def intervals(self):
        return [ranked_intervals(self.similarity, a, self.config.neighbours.intervals) for a in range(len(self.classes))]


def test_concepts_are_deterministic_and_held_out_is_disjoint(concepts, tmp_path):
    again = write_concepts(tmp_path / "again", seed=3, train_composites=6, heldout_concepts=4, train_images=10,
                           heldout_images=10, image_size=32)
    a = sorted(p.relative_to(concepts) for p in concepts.rglob("*.png"))
    assert a == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((concepts / p).read_bytes() == (again / p).read_bytes() for p in a[:20])
    meta = json.loads((concepts / "concepts.json").read_text())
    pairs = json.loads((concepts / "heldout_pairs.json").read_text())
    assert len(pairs) == 4 and meta["train_classes"] == 42 + 6
    train_looks = {json.dumps({k: v for k, v in c.items()}, sort_keys=True) for n, c in meta["classes"].items() if n.startswith("train/")}
    for novel, negative in pairs.items():
        info = meta["classes"][f"heldout/{novel}"]
        body = {"body": info["body"], "colour": info["colour"]}
        assert negative == f"{info['colour']}_{info['body']}"  # the look-alike is the plain body
        composite = {k: v for k, v in info.items() if k != "looks_like"}
        assert json.dumps(composite, sort_keys=True) not in train_looks  # a novel concept is not a training class
        assert json.dumps(body, sort_keys=True) in train_looks  # its look-alike is a known, real concept
        assert not (concepts / "train" / novel).exists()


def test_two_way_episode_has_the_shots_names_and_one_query(concepts):
    ds = LCLEpisodes(LCLEpisodesConfig(root=str(concepts / "heldout"), pairs=str(concepts / "heldout_pairs.json"),
                                       strategy="2way", shots=8))
    pairs = json.loads((concepts / "heldout_pairs.json").read_text())
    for i in range(12):
        ep = ds.episode(i)
        assert len(ep.record.context) == 8 and len(ep.support_labels) == 8
        assert Counter(ep.support_labels) == {ep.positive: 4, ep.negative: 4}
        assert pairs[ep.positive] == ep.negative.replace(" ", "_")  # fixed pairs, names kept
        assert ep.answer == (ep.positive if i % 2 == 0 else ep.negative)
        assert ep.record.query.turns[-1].text == ep.answer
        ids = [ex.media[0].id for ex in ep.record.context] + [ep.record.query.media[0].id]
        assert len(set(ids)) == 9  # the query is not one of the support pictures
        folder = Path(ep.record.query.media[0].id).parts[0]
        assert folder == (ep.positive if i % 2 == 0 else ep.negative.replace(" ", "_"))
    assert ds.episode(5).support_labels == ds.episode(5).support_labels  # a function of the index


def test_queries_are_balanced_and_support_is_shuffled(concepts):
    ds = LCLEpisodes(LCLEpisodesConfig(root=str(concepts / "heldout"), pairs=str(concepts / "heldout_pairs.json"),
                                       strategy="2way", shots=6, num_episodes=200))
    episodes = [ds.episode(i) for i in range(200)]
    assert sum(ep.answer == ep.positive for ep in episodes) == 100
    first = Counter(ep.support_labels[0] == ep.positive for ep in episodes)
    assert 70 < first[True] < 130  # not always the same class first


def test_swapped_positions_show_the_other_name(concepts):
    ds = LCLEpisodes(LCLEpisodesConfig(root=str(concepts / "heldout"), pairs=str(concepts / "heldout_pairs.json"),
                                       strategy="2way", shots=8))
    plain, swapped = ds.episode(3), ds.episode(3, swapped={0, 5})
    for i, (a, b) in enumerate(zip(plain.support_labels, swapped.support_labels)):
        if i in (0, 5):
            assert {a, b} == {plain.positive, plain.negative}
        else:
            assert a == b
    assert swapped.support_truth == plain.support_labels
    assert [ex.turns[-1].text for ex in swapped.record.context] == swapped.support_labels


@pytest.mark.parametrize("strategy", ["2way_random", "2way_weight"])
def test_shot_counts_follow_the_strategy(concepts, strategy):
    ds = _FixedSimilarity(_ranked_config(concepts / "train", strategy=strategy, min_shots=2, max_shots=8))
    ds.similarity = torch.eye(len(ds.classes))
    n = 1000
    seen = Counter(len(ds.episode(i).record.context) for i in range(n))
    expected = shot_distribution(strategy, 16, 2, 8)
    assert set(seen) == set(expected) == {2, 4, 6, 8}
    for shots, p in expected.items():
        assert abs(seen[shots] / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    if strategy == "2way_weight":  # p_m ~ e^m over the even shot counts m (both classes together)
        assert expected[8] / expected[6] == pytest.approx(math.e ** 2)


def test_positives_are_renamed_to_invented_words(concepts):
    ds = _FixedSimilarity(_ranked_config(concepts / "train", strategy="2way", shots=4))
    ds.similarity = torch.eye(len(ds.classes))
    names = {c.replace("_", " ") for c in ds.classes}
    episodes = [ds.episode(i) for i in range(50)]
    assert all(ep.positive not in names and ep.negative in names for ep in episodes)
    assert all(3 <= len(ep.positive) <= 8 and ep.positive.isalpha() for ep in episodes)
    assert len({ep.positive for ep in episodes}) > 40  # a new word per episode


def test_hard_negatives_follow_the_interval_law(concepts):
    cfg = _ranked_config(concepts / "train", strategy="2way", shots=2, neighbours={"intervals": 8})
    ds = _FixedSimilarity(cfg)
    c = len(ds.classes)
    # class i is most similar to its index neighbours: rank of j from i is |i - j|
    idx = torch.arange(c, dtype=torch.float64)
    ds.similarity = -(idx[:, None] - idx[None, :]).abs()
    intervals = ds.intervals
    anchor = 0
    assert [len(x) for x in intervals[anchor]] == [6] * 7 + [5]  # 47 others in 8 near-equal intervals
    assert intervals[anchor][0][:3] == [1, 2, 3]  # most similar first
    n = 6000
    rng = random.Random(0)
    drawn = Counter(draw_negative(intervals[anchor], rng)[1] for _ in range(n))
    probs = interval_probabilities(8)
    assert probs[0] == pytest.approx(8 / 36) and probs[-1] == pytest.approx(1 / 36)
    chi2 = sum((drawn[j + 1] - n * p) ** 2 / (n * p) for j, p in enumerate(probs))
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001
    # through the dataset: every episode's negative, by its interval from its positive
    episodes = [ds.episode(i) for i in range(1500)]
    assert all(ds.classes.index(ep.negative_class) in intervals[ds.classes.index(ep.positive_class)][ep.negative_interval - 1]
               for ep in episodes)
    drawn = Counter(ep.negative_interval for ep in episodes)
    chi2 = sum((drawn[j + 1] - 1500 * p) ** 2 / (1500 * p) for j, p in enumerate(probs))
    assert chi2 < 24.3


def test_similarity_matrix_is_the_weighted_sum_of_cosines():
    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    w = SimilarityWeights(text_text=0.5, image_text=0.8, image_image=0.5)
    s = similarity_matrix(image, text, w)

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)

    expect = 0.5 * cos(text[1], text[3]) + 0.8 * (cos(image[1], text[3]) + cos(text[1], image[3])) + 0.5 * cos(image[1], image[3])
    assert s[1, 3] == pytest.approx(float(expect), abs=1e-9)
    assert torch.allclose(s, s.T)
    with pytest.raises(VlmkitError, match="joint space"):
        similarity_matrix(torch.randn(5, 8), torch.randn(5, 6), w)
    with pytest.raises(VlmkitError, match="text_decoder"):
        similarity_matrix(image, None, SimilarityWeights(image_text=0))


def test_bad_configs_are_clear_errors(concepts, tmp_path):
    with pytest.raises(ValueError, match="odd"):
        LCLEpisodesConfig(root=str(concepts), shots=5)
    with pytest.raises(VlmkitError, match="not a folder"):
        LCLEpisodes(LCLEpisodesConfig(root=str(tmp_path / "nope")))
    with pytest.raises(VlmkitError, match="fewer than 11 pictures"):
        LCLEpisodes(LCLEpisodesConfig(root=str(concepts / "train"), strategy="2way", shots=20, max_shots=20))
    bad = tmp_path / "pairs.json"
    bad.write_text(json.dumps({"zork": "red_circle"}))
    with pytest.raises(VlmkitError, match="zork"):
        LCLEpisodes(LCLEpisodesConfig(root=str(concepts / "heldout"), pairs=str(bad), shots=4, max_shots=4))
