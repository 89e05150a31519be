"""The ``image_use`` evaluator: right, shuffled and blank images.

Models of known behaviour: composed models that cannot see (Flamingo gates at 0, a LLaVA
projector that outputs zeros) score exactly alike under the three conditions; a stand-in that
answers with the name of its image's colour has a gap. The shuffled condition's derangement on its
own, the blank images, and the evaluator run from the smoke profiles' eval lists."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlmkit.core.compose import build_model
from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.evaluators.image_use import (
    CONDITIONS,
    ImageUseConfig,
    ImageUseEvaluator,
    blank_images,
    mean_colour,
    media_fingerprint,
    media_layout,
    shuffled_sources,
)
from vlmkit.core.evaluation.runner import comparison, run_evaluations
from vlmkit.core.interfaces import Dataset, EvalContext, Sample
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import get_registry

PALETTE = {"red": (230, 20, 20), "blue": (20, 20, 230), "lime": (20, 230, 20)}


class ColourQuestions(Dataset):
    """``n`` records "What colour is it?" -> the colour's name, about one picture (``frames``
    None) or one clip of ``frames`` frames of that colour; colours in turn, so records of one colour
    show equal pixels."""

    def __init__(self, prefix: str, n: int, frames: int | None = None, size: int = 24):
        self.prefix, self.n, self.frames, self.size = prefix, n, frames, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Record:
        name = list(PALETTE)[index % len(PALETTE)]
        frames = [Image.new("RGB", (self.size, self.size), PALETTE[name]) for _ in range(self.frames or 1)]
        query = Exchange([Turn("user", "What colour is it?"), Turn("assistant", name)], [Media(f"m{index}", frames)])
        return Record(id=f"{self.prefix}{index}", query=query)


@pytest.fixture(scope="module")
def otter():
    resolved = load_recipe("otter_mimicit", "smoke")
    return build_model(resolved).eval(), resolved


@pytest.fixture(scope="module")
def llava():
    resolved = load_recipe("llava", "smoke")
    return build_model(resolved).eval(), resolved


def _context(model, tmp_path, **datasets) -> EvalContext:
    template = model.templates["eval_images"]
    return EvalContext(datasets=datasets, templates={alias: template for alias in datasets}, output_dir=tmp_path,
                       label="test", progress=False)


def _evaluate(model, context, **options):
    config = ImageUseConfig(data=list(context.datasets), max_new_tokens=6, batch_size=4, **options)
    return ImageUseEvaluator(config).evaluate(model, context)


# ------------------------------------------------------------------------ a model that cannot see
def _blind(model, kind):
    with torch.no_grad():
        if kind == "otter":  # tanh(0) = 0: the cross-attention adds exactly nothing
            for block in model.fusion.blocks:
                block.attn_gate.zero_()
                block.ff_gate.zero_()
        else:  # every image token is the zero vector, whatever the image
            for p in model.connector.parameters():
                p.zero_()
    return model


@pytest.mark.parametrize("kind", ["otter", "llava"])
def test_a_model_that_ignores_its_images_has_no_gap(kind, request, tmp_path):
    model, _ = request.getfixturevalue(kind)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _blind(model, kind)
        datasets = {"pictures": ColourQuestions("p", 6)}
        if kind == "otter":
            datasets["clips"] = ColourQuestions("c", 6, frames=2)
        result = _evaluate(model, _context(model, tmp_path, **datasets))
    finally:
        model.load_state_dict(saved)
    n = sum(len(d) for d in datasets.values())
    assert result.counts["all"] == n and len(result.items) == n and "skipped" not in result.counts
    for item in result.items:
        assert item["loss"]["right"] == item["loss"]["shuffled"] == item["loss"]["blank"]
        assert item["predictions"]["right"] == item["predictions"]["shuffled"] == item["predictions"]["blank"]
        assert item["tokens"] > 0
    assert result.metrics["all: loss right"] == result.metrics["all: loss shuffled"] == result.metrics["all: loss blank"] > 0
    assert result.metrics["all: acc right"] == result.metrics["all: acc shuffled"] == result.metrics["all: acc blank"]
    gaps = {k: v for k, v in result.metrics.items() if k.endswith("gap")}
    assert set(gaps) == {f"{t}: {m} gap" for t in ["all", *datasets] for m in ("loss", "acc")}
    assert all(v == 0.0 for v in gaps.values()), gaps


# ------------------------------------------------------------- a model that reads its image's colour
class ColourReader(torch.nn.Module):
    """A stand-in VLM of known behaviour. It takes the mean pixel of its sample's first image (all
    frames), picks the palette colour nearest to it and knows one answer, that colour's name: after
    the ``<answer>`` token its logits favour (by 10) the next token of `` <name><|endofchunk|><eos>``
    in a chain of bigrams; everything else is uniform. Tokenizer, preprocessing, placeholders and
    templates are the wrapped smoke model's."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        tok = inner.decoder.tokenizer
        pre = inner.encoder.preprocess
        rgb = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255.0
        self.register_buffer("palette", (rgb - torch.tensor(pre.mean)) / torch.tensor(pre.std))
        self.vocab = len(tok)
        table = torch.full((len(PALETTE), self.vocab), -1, dtype=torch.long)
        for c, name in enumerate(PALETTE):
            chain = [tok.convert_tokens_to_ids("<answer>")]
            chain += tok(f" {name}<|endofchunk|>{tok.eos_token}", add_special_tokens=False)["input_ids"]
            assert len(set(chain)) == len(chain)
            for prev, nxt in zip(chain, chain[1:]):
                table[c, prev] = nxt
        self.register_buffer("table", table)

    decoder = property(lambda self: self.inner.decoder)
    encoder = property(lambda self: self.inner.encoder)
    templates = property(lambda self: self.inner.templates)

    def placeholder_tokens(self, num_frames: int = 1) -> int:
        return self.inner.placeholder_tokens(num_frames)

    def collator(self, **kwargs):
        return self.inner.collator(**kwargs)

    def colour_of(self, vision_x: torch.Tensor) -> torch.Tensor:
        mean = vision_x[:, 0].mean(dim=(1, 3, 4))  # (B, 3): first image, every frame and pixel
        return torch.cdist(mean, self.palette).argmin(-1)

    def forward(self, input_ids, attention_mask, vision_x, media_mask, **kwargs):
        nxt = self.table[self.colour_of(vision_x)[:, None], input_ids]  # (B, L)
        logits = torch.zeros((*input_ids.shape, self.vocab))
        logits.scatter_(-1, nxt.clamp(min=0)[..., None], (nxt >= 0).float()[..., None] * 10.0)
        return SimpleNamespace(logits=logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, vision_x, media_mask, max_new_tokens, eos_token_id, pad_token_id,
                 **kwargs):
        seq, new = input_ids, []
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        for _ in range(max_new_tokens):
            token = self(seq, attention_mask, vision_x, media_mask).logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            new.append(token)
            done |= torch.isin(token, torch.tensor(eos_token_id))
            seq = torch.cat([seq, token[:, None]], 1)
        return torch.stack(new, 1)


def test_a_model_that_reads_its_images_has_a_gap(otter, tmp_path):
    model = ColourReader(otter[0])
    datasets = {"pictures": ColourQuestions("p", 9), "clips": ColourQuestions("c", 6, frames=3)}
    result = _evaluate(model, _context(model, tmp_path, **datasets), seed=3)
    m = result.metrics
    assert result.counts["all"] == 15 and len(result.items) == 15
    # right images: every answer right and nearly certain; another colour's images: every answer wrong
    assert m["all: acc right"] == 1.0 and m["all: acc shuffled"] == 0.0
    assert m["all: acc gap"] == m["pictures: acc gap"] == m["clips: acc gap"] == 1.0
    assert m["all: loss right"] < 0.05 < 2.0 < m["all: loss shuffled"]
    for t in ("all", "pictures", "clips"):
        assert m[f"{t}: loss gap"] > 2.0
    # blank: the mean colour of the three is one grey, read as one colour: right for a third at most
    assert m["all: acc blank"] <= 0.4 and m["all: loss blank"] > m["all: loss right"]
    by_id = {item["id"]: item for item in result.items}
    for item in result.items:
        assert item["predictions"]["right"] == item["reference"]
        source = by_id[item["shuffled_from"]]
        assert source["data"] == item["data"] and source["reference"] != item["reference"]
        assert item["predictions"]["shuffled"] == source["reference"]  # it reads the swapped-in image
        assert len(set(item["predictions"].values()) - {item["reference"]}) >= 1
    assert result.curves["accuracy"] == {"right": 1.0, "shuffled": 0.0, "blank": m["all: acc blank"]}
    assert list(result.curves["answer loss"]) == list(CONDITIONS)


def test_the_gap_is_per_question_type_and_skips_what_cannot_be_shuffled(otter, tmp_path):
    model = ColourReader(otter[0])
    types = {f"p{i}": ("warm" if i % 3 == 0 else "cool") for i in range(6)}
    types["q0"] = "warm"
    path = tmp_path / "types.json"
    path.write_text(json.dumps(types))
    datasets = {"pictures": ColourQuestions("p", 6), "lonely": ColourQuestions("q", 1, size=40)}
    # 'lonely' has the only 40 px picture: pixel sizes do not split layouts, so it still trades
    result = _evaluate(model, _context(model, tmp_path, **datasets), question_types=str(path))
    assert result.counts["all"] == 7 and result.counts["warm: acc gap"] == 3 and result.counts["cool: acc gap"] == 4
    assert "skipped" not in result.counts and {i["type"] for i in result.items} == {"warm", "cool"}
    for name in ("warm", "cool"):
        group = [i for i in result.items if i["type"] == name]
        right = sum(i["correct"]["right"] for i in group) / len(group)
        shuffled = sum(i["correct"]["shuffled"] for i in group) / len(group)
        tokens = sum(i["tokens"] for i in group)
        loss = {c: sum(i["nll"][c] for i in group) / tokens for c in ("right", "shuffled")}
        assert result.metrics[f"{name}: acc gap"] == pytest.approx(right - shuffled)
        assert result.metrics[f"{name}: loss gap"] == pytest.approx(loss["shuffled"] - loss["right"])
        assert right == 1.0 and result.metrics[f"{name}: loss gap"] > 0
    # a clip with no other clip, and a picture all of whose partners show the same pixels: skipped
    datasets = {"pictures": ColourQuestions("p", 6), "clip": ColourQuestions("c", 1, frames=2)}
    same = {"pictures": _Only(ColourQuestions("p", 6), 0, 3), "other": ColourQuestions("o", 1, size=40)}
    result = _evaluate(model, _context(model, tmp_path, **datasets))
    skipped = [i for i in result.items if "skipped" in i]
    assert [i["id"] for i in skipped] == ["c0"] and result.counts["skipped"] == 1 and result.counts["all"] == 6
    result = _evaluate(model, _context(model, tmp_path, **same))
    skipped = [i for i in result.items if "skipped" in i]
    assert len(skipped) == 2 and result.counts["all"] == 2  # 3 equal pictures, 1 other: 2 can trade
    with pytest.raises(VlmkitError, match="no held-out question has images"):
        _evaluate(model, _context(model, tmp_path, lonely=ColourQuestions("q", 1)))


class _Only(Dataset):
    """``dataset``'s record ``index`` repeated ``n`` times under new ids."""

    def __init__(self, dataset, index, n):
        self.dataset, self.index, self.n = dataset, index, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        record = self.dataset[self.index]
        record.id = f"{record.id}-{i}"
        return record


# ------------------------------------------------------------------------------- the derangement
def test_the_derangement_never_keeps_a_samples_images_and_is_seeded():
    contents = [f"img{k // 3}" for k in range(30)]  # three questions per picture, as the demo's
    layouts = [(1,)] * 30
    sources = shuffled_sources(layouts, contents, seed=0)
    assert sorted(sources) == list(range(30))  # a permutation ...
    assert all(s != k and contents[s] != contents[k] for k, s in enumerate(sources))  # ... of other pictures
    assert shuffled_sources(layouts, contents, seed=0) == sources
    assert len({tuple(shuffled_sources(layouts, contents, seed=s)) for s in range(5)}) == 5
    distinct = shuffled_sources([(1,)] * 7, list(range(7)), seed=1)
    assert sorted(distinct) == list(range(7)) and all(s != k for k, s in enumerate(distinct))


def test_the_derangement_only_trades_between_samples_of_one_layout():
    layouts = [(1,), (4,), (1,), (1, 1), (4,), (1,), (1, 1), (4,), (1,)]
    sources = shuffled_sources(layouts, list(range(len(layouts))), seed=7)
    assert all(s is not None and layouts[s] == layouts[k] and s != k for k, s in enumerate(sources))
    # alone in its layout, or in a block of equal pixels larger than half the layout: None
    assert shuffled_sources([(1,), (4,)], ["a", "b"], seed=0) == [None, None]
    lopsided = shuffled_sources([(1,)] * 5, ["a", "a", "a", "a", "b"], seed=0)
    assert Counter(s is None for s in lopsided) == {True: 3, False: 2}
    assert all(s is None or ["a", "a", "a", "a", "b"][s] != ["a", "a", "a", "a", "b"][k] for k, s in enumerate(lopsided))


def test_layouts_fingerprints_and_blank_images():
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    blue = Image.new("RGB", (8, 6), (0, 0, 255))
    clip = [red, blue, red]
    assert media_layout([red]) == (1,) and media_layout([clip]) == (3,) and media_layout([red, clip]) == (1, 3)
    assert media_layout([]) == ()
    assert media_fingerprint([red]) == media_fingerprint([red.copy()]) != media_fingerprint([blue])
    assert media_fingerprint([red, blue]) != media_fingerprint([[red, blue]])
    samples = [Sample(id="a", images=[red]), Sample(id="b", images=[clip])]
    assert mean_colour(samples) == (191, 0, 64)  # red, red, blue, red: each frame weighs the same
    blanks = blank_images([red, clip], (1, 2, 3))
    assert blanks[0].size == (8, 6) and len(blanks[1]) == 3 and all(f.size == (8, 6) for f in blanks[1])
    assert all(f.getextrema() == ((1, 1), (2, 2), (3, 3)) for f in [blanks[0], *blanks[1]])


# ------------------------------------------------------------------ registered, and in the recipes
def test_image_use_is_a_registered_builtin_evaluator():
    registry = get_registry()
    assert "image_use" in registry.names("evaluator")
    assert registry.component_class("evaluator", "image_use") is ImageUseEvaluator
    assert registry.entry("evaluator", "image_use").provider.describe() == "vlmkit (built-in)"
    with pytest.raises(RecipeError, match=r"eval\.2\.shuffle"):  # after instructions and instructions_in_context
        load_recipe("otter_mimicit", "smoke", ["eval.2.shuffle=true"])


@pytest.mark.parametrize("recipe", ["otter_mimicit", "llava"])
def test_recipes_evaluate_image_use_with_the_data_of_their_instructions_evaluator(recipe):
    for profile in ("demo", "smoke"):
        resolved = load_recipe(recipe, profile)
        specs = {spec.entry_name or spec.name: spec.config for spec in resolved.evaluators}
        assert specs["image_use"].data == specs["instructions"].data
        assert specs["image_use"].question_types == specs["instructions"].question_types
    assert specs["image_use"].limit == 12  # smoke: enough records for three pictures (clips) or more


def test_the_smoke_profile_runs_image_use_and_writes_its_results(otter, tmp_path):
    model, resolved = otter
    results = run_evaluations(model, resolved, tmp_path, "before", progress=False)
    assert [r.name for r in results] == ["instructions", "instructions_in_context", "image_use"]
    result = results[2]
    assert result.counts["all"] == 24 and "skipped" not in result.counts  # 12 questions on pictures, 12 on clips
    assert {i["type"] for i in result.items} <= set(json.loads(open(resolved.evaluators[2].config.question_types).read()).values())
    for row in ("all: loss right", "all: loss shuffled", "all: loss blank", "all: acc right", "all: loss gap",
                "all: acc gap", "colour: loss gap", "video direction: acc gap"):
        assert row in result.metrics
    folder = tmp_path / "eval" / "before"
    saved = json.loads((folder / "image_use.json").read_text())
    assert saved["metrics"] == result.metrics and len(saved["items"]) == 24 and saved["curves"] == result.curves
    assert "| all: loss gap |" in (folder / "image_use.md").read_text()
    assert (folder / "image_use.png").stat().st_size > 0
    text = comparison(results, results)
    assert "| image_use: loss per answer token / accuracy by images | before | after | n |" in text


def test_comparison_pairs_before_and_after_by_name_whatever_their_order():
    """A resumed run reads its 'before' results back from files (alphabetical: image_use first)
    while 'after' runs in recipe order: each after-table must sit beside its own before-table."""
    from vlmkit.core.interfaces import EvalResult

    inst_b = EvalResult(name="instructions", metric="acc", metrics={"all": 0.1})
    use_b = EvalResult(name="image_use", metric="gap", metrics={"loss gap": 0.2})
    inst_a = EvalResult(name="instructions", metric="acc", metrics={"all": 0.9})
    use_a = EvalResult(name="image_use", metric="gap", metrics={"loss gap": 0.7})
    text = comparison([use_b, inst_b], [inst_a, use_a])
    first, second = text.split("loss gap")[0], text.split("loss gap", 1)[1]
    assert "0.100" in first and "0.900" in first  # instructions: its own before beside its after
    assert "0.200" in second and "0.700" in second
    assert "0.200" not in first
