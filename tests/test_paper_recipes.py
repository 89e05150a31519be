"""The paper profiles say what the papers did (REFERENCE 1.1-1.5), read the way `recipes show NAME
--profile paper` resolves them (:func:`load_recipe`), and the code paths they rely on: clearing a
mapping in a merge (``!replace``), LLaVA-Pretrain's conversation-format captions, mPLUG-Owl's
fixed 128 + 128 samples per step, Otter starting from OpenFlamingo, the LCL strategies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.tiny import resolved_toy
from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.core.recipe.loader import load_recipe


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def stage(resolved, name):
    return next(s for s in resolved.recipe.stages if s.name == name)


# ---------------------------------------------------------------------- 1. merging an empty mapping
def test_item1_paper_profiles_clear_the_demo_s_per_component_learning_rates():
    llava = load_recipe("llava", "paper")
    instruct = stage(llava, "instruct")
    assert (instruct.lr, instruct.lr_per_component) == (2.0e-5, {})  # LLaVA-1.5: projector and LLM at 2e-5
    lcl = stage(load_recipe("lcl_repro", "paper"), "train")
    assert (lcl.lr, lcl.lr_per_component) == (2.0e-5, {})
    owl = stage(load_recipe("mplug_owl", "paper"), "align")
    assert (owl.lr, owl.lr_per_component) == (1.0e-4, {})
    lora = stage(load_recipe("llava_lora", "paper"), "instruct")
    assert (lora.lr, lora.lr_per_component) == (2.0e-4, {"connector": 2.0e-5})
    assert "!replace" not in load_recipe("llava", "paper").to_yaml()


PARENT = """\
name: parent
extends: toy_prefix
stages:
  - {name: instruct, lr_per_component: {connector: 1.0e-3, decoder: 1.0e-4}}
profiles:
  clear: {stages: [{name: instruct, lr_per_component: !replace {}}]}
  only: {stages: [{name: instruct, lr_per_component: !replace {connector: 5.0e-4}}]}
  merge: {stages: [{name: instruct, lr_per_component: {connector: 5.0e-4}}]}
  empty: {stages: [{name: instruct, lr_per_component: {}}]}
"""

CHILD = """\
name: child
extends: parent.yaml
stages:
  - {name: instruct, lr_per_component: !replace {fusion: 2.0e-4}}
profiles:
  clear: {stages: [{name: instruct, lr: 0.5}]}
  mine: {stages: [{name: instruct, lr_per_component: !replace {decoder: 3.0e-4}}]}
"""


def test_item1_replace_tag_clears_or_replaces_a_mapping_in_a_profile_through_extends_and_set(tmp_path):
    parent = write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", CHILD)

    def lrs(ref, profile=None, overrides=()):
        resolved = load_recipe(ref, profile, list(overrides), bare=profile is None)
        return stage(resolved, "instruct").lr_per_component

    assert lrs(parent) == {"connector": 1.0e-3, "decoder": 1.0e-4}
    assert lrs(parent, "clear") == {}  # cleared
    assert lrs(parent, "only") == {"connector": 5.0e-4}  # replaced wholesale
    assert lrs(parent, "merge") == {"connector": 5.0e-4, "decoder": 1.0e-4}  # untagged: key by key, as before
    assert lrs(parent, "empty") == {"connector": 1.0e-3, "decoder": 1.0e-4}  # an untagged {} adds nothing
    # through extends: the child's body replaces the parent's mapping ...
    assert lrs(child) == {"fusion": 2.0e-4}
    # ... the parent's profile still clears what the child's body set, under the same profile name
    resolved = load_recipe(child, "clear")
    assert stage(resolved, "instruct").lr_per_component == {} and stage(resolved, "instruct").lr == 0.5
    assert lrs(child, "mine") == {"decoder": 3.0e-4}
    # --set replaces the value at its path: {} clears (the tag is accepted and changes nothing)
    assert lrs(parent, "merge", ["stages.instruct.lr_per_component={}"]) == {}
    assert lrs(child, "mine", ["stages.instruct.lr_per_component=!replace {}"]) == {}
    # a list: stages: !replace [...] drops the parent's stages
    only_one = write(tmp_path / "one.yaml", "name: one\nextends: parent.yaml\nstages: !replace\n"
                     "  - {name: solo, data: [shapes], tune: {encoder: frozen, connector: full, fusion: frozen,"
                     " decoder: frozen}, lr: 1.0e-3, max_steps: 2, batch_size: 2}\n")
    assert [s.name for s in load_recipe(only_one, bare=True).recipe.stages] == ["solo"]
    # the resolved recipe holds no tag and round-trips
    text = load_recipe(child, "mine").to_yaml()
    assert "!replace" not in text
    again = write(tmp_path / "again.yaml", text)
    assert stage(load_recipe(again), "instruct").lr_per_component == {"decoder": 3.0e-4}


def test_item1_replace_tag_misuse_is_a_clear_error(tmp_path):
    bad = write(tmp_path / "bad.yaml", "name: bad\nextends: toy_prefix\nseed: !replace 3\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: line 3, column 7: .*!replace marks a mapping or a list"):
        load_recipe(bad)
    typo = write(tmp_path / "typo.yaml", "name: typo\nextends: toy_prefix\nrun: !replce {}\n")
    with pytest.raises(RecipeError, match=r"unknown tag '!replce'; did you mean '!replace'\?"):
        load_recipe(typo)


# ---------------------------------------------------------------------- 6. LLaVA stage 1 data
PRETRAIN_558K = [
    {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
    {"id": "002239345", "image": "00223/002239345.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWrite a terse but informative summary of the picture."},
        {"from": "gpt", "value": "a grey watch with an army style strap"}]},
    {"id": "001208103", "image": "00120/001208103.jpg", "conversations": [
        {"from": "human", "value": "What is in the photo?\n<image>"},
        {"from": "gpt", "value": "an old red tractor in a field"}]},
]


def test_item6_llava_paper_stage1_reads_the_558k_conversations_and_trains_only_the_captions(tmp_path):
    from vlmkit.core.data.collate import IGNORE, Collator
    from vlmkit.core.data.rendered import RenderedDataset
    from vlmkit.core.interfaces import Preprocess
    from vlmkit.core.registry import get_registry
    from vlmkit.decoders.byte_tokenizer import byte_level_tokenizer

    images = tmp_path / "images"
    for k, record in enumerate(PRETRAIN_558K):
        (images / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * k, 90, 200)).save(images / record["image"], format="JPEG")
    path = write(tmp_path / "blip_laion_cc_sbu_558k.json", json.dumps(PRETRAIN_558K))
    resolved = load_recipe("llava", "paper", [f"data.captions.path={path}", f"data.captions.image_folder={images}"])
    assert stage(resolved, "align").data == ["captions"]
    spec, template = resolved.datasets["captions"], resolved.templates["captions"]
    assert (spec.name, template.name) == ("llava", "llava_plain")

    registry = get_registry()
    records = registry.component_class("dataset", spec.name)(spec.config)
    assert len(records) == 3 and records.summary() == ""  # nothing skipped
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    data = RenderedDataset(records, registry.component_class("template", template.name)(template.config), tokenizer,
                           "captions")
    collate = Collator(tokenizer=tokenizer, preprocess=Preprocess(image_size=4, mean=(0.0,) * 3, std=(1.0,) * 3),
                       image_token="<image>", placeholder_tokens=1)
    for k, record in enumerate(PRETRAIN_558K):
        caption = record["conversations"][1]["value"]
        batch = collate([data[k]])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        assert tokenizer.decode(ids[batch["attention_mask"][0].bool()].tolist()) == f"<image>{caption}\n"  # no instruction
        assert tokenizer.decode(ids[labels != IGNORE].tolist()) == f"{caption}\n"  # the caption is the only loss span
        assert int(batch["media_mask"][0].sum()) == 1


# ---------------------------------------------------------------------- 7. mPLUG-Owl hyper-parameters
def test_item7_mplug_owl_paper_hyper_parameters():
    resolved = load_recipe("mplug_owl", "paper")
    align, instruct = stage(resolved, "align"), stage(resolved, "instruct")
    assert align.batch_size * align.grad_accum == 4096  # image-text pairs per step
    assert (align.warmup_steps, align.max_steps, align.lr) == (2000, 50000, 1.0e-4)
    assert align.optimizer.betas == (0.9, 0.98)
    assert (align.optimizer.eps, align.optimizer.weight_decay) == (1.0e-6, 0.1)
    assert instruct.batch_size * instruct.grad_accum == 256
    assert (instruct.warmup_steps, instruct.max_steps, instruct.lr) == (50, 2000, 2.0e-5)
    assert instruct.optimizer.weight_decay == 1.0e-4
    assert instruct.mix == {"instructions": 128, "text": 128}  # a fixed proportion, not by dataset size
    assert resolved.datasets["text"].name == "text_only" and resolved.datasets["instructions"].name == "llava"


@pytest.mark.parametrize("world_size", [1, 2])
def test_item7_fixed_counts_give_exactly_those_samples_per_global_batch(world_size):
    from vlmkit.core.engine.sampler import StageBatchSampler, mix_options

    resolved = load_recipe("mplug_owl", "paper")
    instruct = stage(resolved, "instruct")
    sizes = {"instructions": 1000, "text": 700}  # text runs out after 5 steps and starts a new pass
    args = dict(seed=resolved.recipe.seed, stage_index=1, **mix_options(instruct, resolved.recipe.data),
                names=list(instruct.data), world_size=world_size)
    ranks = [iter(StageBatchSampler([sizes[a] for a in instruct.data], instruct.batch_size, rank=r, **args))
             for r in range(world_size)]
    steps = []
    for _ in range(12):
        step = [i for _ in range(instruct.grad_accum) for it in ranks for i in next(it)]
        assert len(step) == 256
        multimodal = [i for i in step if i < 1000]
        text = [i - 1000 for i in step if i >= 1000]
        assert (len(multimodal), len(text)) == (128, 128)
        assert len(set(multimodal)) == 128 and len(set(text)) == 128
        steps.append(step)
    first_pass = [i for s in steps[:5] for i in s if i >= 1000]
    assert len(set(first_pass)) == 640  # no repeats within a pass over the text-only data
    # resumable: starting at micro-batch 5 gives what the uninterrupted run saw from there
    if world_size == 1:
        resumed = iter(StageBatchSampler([sizes[a] for a in instruct.data], instruct.batch_size, start=5, **args))
        flat = [i for s in steps for i in s]
        assert next(resumed) + next(resumed) == flat[5 * 128: 7 * 128]


def test_item7_fixed_counts_are_validated(tmp_path):
    def mix(counts, grad_accum=2):
        def mutate(data):
            data["data"]["more"] = {"type": "toy_captions", "template": "llava_plain", "num_samples": 16, "image_size": 32}
            data["stages"][1].update(data=["shapes", "more"], mix=counts, batch_size=2, grad_accum=grad_accum)
            data["profiles"]["smoke"]["stages"][1]["batch_size"] = 2
        return mutate

    with pytest.raises(RecipeError, match=r"stages\.1: mix: the per-step counts add up to 5 samples, but a step is "
                                          r"batch_size \* grad_accum = 2 \* 2 = 4"):
        resolved_toy(tmp_path, mix({"shapes": 4, "more": 1}))
    with pytest.raises(RecipeError, match=r"no count for: more"):
        resolved_toy(tmp_path, mix({"shapes": 4}))
    with pytest.raises(RecipeError, match=r"stages\.1\.mix: got 'evn'; did you mean 'even'\?"):
        resolved_toy(tmp_path, mix("evn"))
    assert resolved_toy(tmp_path, mix({"shapes": 3, "more": 1})).recipe.stages[1].mix == {"shapes": 3, "more": 1}


def test_item7_the_engine_takes_the_fixed_counts_at_every_step(tmp_path, monkeypatch):
    from vlmkit.core.engine import run
    from vlmkit.core.engine.sampler import StageBatchSampler

    def mutate(data):
        data["data"]["more"] = {"type": "toy_captions", "template": "llava_plain", "num_samples": 16, "image_size": 32}
        data["stages"][1].update(data=["shapes", "more"], mix={"shapes": 3, "more": 1}, grad_accum=2)
        data["profiles"]["smoke"]["stages"][1]["batch_size"] = 2

    resolved = resolved_toy(tmp_path, mutate)
    seen: list[list[int]] = []
    original = StageBatchSampler.__iter__

    def recording(self):
        for batch in original(self):
            if self.counts is not None:
                seen.append(batch)
            yield batch

    monkeypatch.setattr(StageBatchSampler, "__iter__", recording)
    result = run(resolved, tmp_path / "run", progress=False)
    assert result.stages[1].steps == 3
    steps = [seen[2 * k] + seen[2 * k + 1] for k in range(3)]
    for step in steps:  # shapes: indices 0..63, more: 64..79
        assert (sum(i < 64 for i in step), sum(i >= 64 for i in step)) == (3, 1)


# ---------------------------------------------------------------------- 8. Otter starts from OpenFlamingo
def test_item8_otter_paper_starts_from_openflamingo_and_a_missing_checkpoint_stops_the_run(tmp_path, monkeypatch, capsys):
    from vlmkit.core.cli import main
    from vlmkit.core.engine import run

    root = tmp_path / "data"
    monkeypatch.setenv("VLMKIT_DATA_ROOT", str(root))
    resolved = load_recipe("otter_mimicit", "paper")
    assert not stage(resolved, "align").enabled  # the caption stage is OpenFlamingo's pre-training
    init = stage(resolved, "instruct").init_from
    assert init.format == "openflamingo"
    checkpoint = root / "OpenFlamingo-9B" / "checkpoint.pt"
    assert Path(init.path) == checkpoint
    assert init.added_tokens == ["<|endofchunk|>", "<image>", "<PAD>"]

    with pytest.raises(RecipeError) as info:
        run(resolved, tmp_path / "run", progress=False)
    message = str(info.value)
    for words in ("stages.instruct.init_from.path", f"'{checkpoint}' does not exist", "OpenFlamingo-9B",
                  "put the file there", "--set stages.instruct.init_from.path=FILE",
                  "--set stages.instruct.init_from=null --set stages.align.enabled=true"):
        assert words in message
    assert not (tmp_path / "run").exists()  # stopped before building anything
    assert main(["run", "otter_mimicit", "--profile", "paper", "--output-dir", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "stages.instruct.init_from.path" in err and "Traceback" not in err


def test_item8_the_checkpoint_in_place_passes_and_training_from_scratch_is_the_override(tmp_path, monkeypatch):
    from vlmkit.core.recipe.preflight import check_init_from_files

    root = tmp_path / "data"
    monkeypatch.setenv("VLMKIT_DATA_ROOT", str(root))
    resolved = load_recipe("otter_mimicit", "paper")
    (root / "OpenFlamingo-9B").mkdir(parents=True)
    (root / "OpenFlamingo-9B" / "checkpoint.pt").write_bytes(b"")
    check_init_from_files(resolved)  # in place: the run goes on
    scratch = load_recipe("otter_mimicit", "paper", ["stages.align.enabled=true", "stages.instruct.init_from=null"])
    assert stage(scratch, "align").enabled and stage(scratch, "instruct").init_from is None
    check_init_from_files(scratch)
    # a resumed run past the stage's start does not need the file any more
    (root / "OpenFlamingo-9B" / "checkpoint.pt").unlink()
    with pytest.raises(RecipeError, match="stages.instruct.init_from.path"):
        check_init_from_files(resolved, from_stage=0)
    check_init_from_files(resolved, from_stage=2)
    # Otter's ablations swap the part OpenFlamingo's weights would fill: they train from scratch
    for name in ("ablation_otter_qformer", "ablation_otter_abstractor", "ablation_otter_mlp", "ablation_otter_prefix"):
        ablation = load_recipe(name, "paper")
        assert stage(ablation, "align").enabled and stage(ablation, "instruct").init_from is None, name


# ---------------------------------------------------------------------- 9. LCL strategies
def test_item9_lcl_paper_trains_2way_on_16_shots_then_2way_random_on_2_to_16():
    from vlmkit.lcl.episodes import shot_distribution

    resolved = load_recipe("lcl_repro", "paper")
    enabled = [s for s in resolved.recipe.stages if s.enabled]
    assert [s.name for s in enabled] == ["train", "train_random"]  # [2-way] first
    first, then = (resolved.datasets[s.data[0]].config for s in enabled)
    assert (first.strategy, first.shots) == ("2way", 16)
    assert (then.strategy, then.min_shots, then.max_shots) == ("2way_random", 2, 16)
    assert stage(resolved, "train_random").epochs == 10
    assert shot_distribution(then.strategy, then.shots, then.min_shots, then.max_shots) == \
        {m: 1 / 8 for m in range(2, 17, 2)}
    weight = load_recipe("lcl_repro", "paper", ["data.lcl_random.strategy=2way_weight"]).datasets["lcl_random"].config
    probs = shot_distribution(weight.strategy, weight.shots, weight.min_shots, weight.max_shots)
    total = sum(math.exp(m) for m in range(2, 17, 2))  # m: the shot counts, both classes together
    assert probs == pytest.approx({m: math.exp(m) / total for m in range(2, 17, 2)}, rel=1e-12)
    twin = load_recipe("lcl_repro_icl", "paper")  # the ICL-only twin: the same stages on in-context data
    assert [(s.name, s.data) for s in twin.recipe.stages if s.enabled] == [("train", ["in_context"]),
                                                                          ("train_random", ["in_context"])]


def test_item9_mix_is_the_2way_task_mixed_evenly_with_instruction_data(tmp_path):
    from vlmkit.lcl.episodes import LCLEpisodes, LCLEpisodesConfig
    from vlmkit.lcl.synthetic_concepts import write_concepts

    concepts = write_concepts(tmp_path / "concepts", seed=3, train_composites=2, heldout_concepts=2, train_images=10,
                              heldout_images=10, image_size=16)
    episodes = LCLEpisodes(LCLEpisodesConfig(root=str(concepts / "heldout"), pairs=str(concepts / "heldout_pairs.json"),
                                             strategy="mix", shots=16, min_shots=2, max_shots=16, num_episodes=40))
    assert {len(episodes.episode(i).record.context) for i in range(40)} == {16}
    mixed = ["data.lcl_train.strategy=mix", "stages.train_random.enabled=false",
             "data.instructions={type: llava, template: vicuna_v1, path: shikra.json}",
             "stages.train.data=[lcl_train, instructions]"]
    assert stage(load_recipe("lcl_repro", "paper", mixed + ["stages.train.mix=even"]), "train").mix == "even"
    equal = load_recipe("lcl_repro", "paper", mixed + ["stages.train.mix={lcl_train: 32, instructions: 32}"])
    assert stage(equal, "train").mix == {"lcl_train": 32, "instructions": 32}
    with pytest.raises(RecipeError, match="strategy 'mix'"):
        load_recipe("lcl_repro", "paper", mixed + ["stages.train.mix={lcl_train: 48, instructions: 16}"])


def test_item9_image_text_similarity_sums_both_directions():
    from vlmkit.lcl.neighbours import SimilarityWeights, similarity_matrix

    torch.manual_seed(1)
    image, text = torch.randn(4, 6), torch.randn(4, 6)
    s = similarity_matrix(image, text, SimilarityWeights(text_text=0.0, image_text=0.8, image_image=0.0))

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))

    assert float(s[0, 2]) == pytest.approx(0.8 * (cos(image[0], text[2]) + cos(text[0], image[2])), abs=1e-12)


def test_item9_position_ablation_runs_at_16_shots_positions_1_to_16():
    resolved = load_recipe("lcl_repro", "paper")
    position = next(e for e in resolved.evaluators if e.name == "lcl_position")
    assert position.config.shots == 16  # "16-shot" = 8 pictures per class; the evaluator swaps each position 1..16
