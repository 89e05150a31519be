"""Every shipped recipe: its smoke profile trains all its stages, evaluates, exports, loads and
generates; its paper profile builds on the meta device with the published parameter counts; an
ablation is a short recipe that swaps one part."""

from __future__ import annotations

import pytest
import torch

from vlmkit.core.chat import Chat, pick_template
from vlmkit.core.engine import run
from vlmkit.core.export import load_with_recipe
from vlmkit.core.params import format_report, stage_parameters
from vlmkit.core.recipe.loader import find_recipe, load_recipe, shipped_recipes

MAIN = ["otter_mimicit", "llava", "llava_lora", "mplug_owl", "blip2"]
ABLATIONS = sorted(n for n in shipped_recipes() if n.startswith("ablation_"))
SHIPPED = MAIN + ABLATIONS


def test_the_issue_s_recipes_and_ablations_are_shipped():
    assert set(SHIPPED) <= set(shipped_recipes())
    assert set(ABLATIONS) == {"ablation_otter_qformer", "ablation_otter_abstractor", "ablation_otter_mlp",
                              "ablation_otter_prefix", "ablation_llava_perceiver", "ablation_mplug_owl_mlp"}


@pytest.mark.parametrize("name", ABLATIONS)
def test_an_ablation_is_at_most_ten_lines_and_swaps_one_part_of_its_parent(name):
    import yaml

    text = find_recipe(name).read_text()
    assert len([line for line in text.splitlines() if line.strip()]) <= 10
    child = load_recipe(name, "demo")
    parent = load_recipe(yaml.safe_load(text)["extends"], "demo")
    swapped = [k for k in ("encoder", "connector", "fusion", "decoder")
               if child.components[k].name != parent.components[k].name]
    assert len(swapped) == 1
    assert [s.name for s in child.recipe.stages] == [s.name for s in parent.recipe.stages]


@pytest.mark.parametrize("name", SHIPPED)
def test_profiles_are_smoke_demo_paper_and_demo_is_the_default(name):
    resolved = load_recipe(name)
    assert resolved.profile == "demo"
    for profile in ("smoke", "paper"):
        assert load_recipe(name, profile).profile == profile


@pytest.mark.parametrize("name", SHIPPED)
def test_demo_profiles_evaluate_with_and_without_in_context_examples_paper_profiles_read_no_demo_data(
        name, tmp_path, monkeypatch):
    """Every recipe that evaluates on the demo's held-out questions also evaluates the same stills
    with in-context examples (its own entry name, its own files); the paper profile never reads
    the demo data (loading it writes nothing to the cache)."""
    for profile in ("demo", "smoke"):
        entries = {e.entry_name or e.name: e.config for e in load_recipe(name, profile).evaluators}
        assert entries["instructions"].data[0] == "eval_images", profile
        icl = entries["instructions_in_context"]
        assert icl.data == ["eval_in_context"] and icl.question_types.endswith("/DEMO_ICL_EVAL_types.json"), profile
    spec = load_recipe(name).datasets["eval_in_context"].config
    assert spec.group == "IMAGE_TEXT_IN_CONTEXT" and str(spec.train_config).endswith("/DEMO_ICL_EVAL_train.json")
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path / "cache"))
    paper = load_recipe(name, "paper")
    assert "instructions_in_context" not in [e.entry_name for e in paper.evaluators]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", SHIPPED)
def test_smoke_profile_trains_every_stage_evaluates_exports_and_the_export_generates(name, tmp_path):
    resolved = load_recipe(name, "smoke")
    result = run(resolved, tmp_path / "run", progress=False)
    stages = [s for s in resolved.recipe.stages if s.enabled]
    assert [s.name for s in result.stages] == [s.name for s in stages]
    for spec, done in zip(stages, result.stages):
        assert done.steps == spec.max_steps
        assert all(torch.isfinite(torch.tensor(done.losses)))
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "loss.png").is_file()
    after = result.evaluations["after"][0]
    assert after.counts["all"] == len(after.items) > 0
    assert after.metrics["all"] == pytest.approx(sum(i["correct"] for i in after.items) / len(after.items))
    if resolved.recipe.run.eval_before:
        assert result.evaluations["before"][0].counts == after.counts
    in_context = next(r for r in result.evaluations["after"] if r.name == "instructions_in_context")
    assert in_context.counts["all"] == 3 and (tmp_path / "run" / "eval" / "after" / "instructions_in_context.json").is_file()

    model, loaded = load_with_recipe(tmp_path / "run")  # the run folder's export/
    trained = result.model.eval()
    batch = _batch(model, loaded)
    with torch.no_grad():
        ours, theirs = model(**batch).logits, trained(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()  # LoRA merged into the export
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    chat = Chat(model, pick_template(model, loaded, None), image, [(image, "What colour is it?", "red")], max_new_tokens=3)
    answer = chat.ask("What colour is the square?")
    assert isinstance(answer, str)
    assert chat.history == [("What colour is the square?", answer or "...")]


def _batch(model, resolved):
    """The first held-out sample of the recipe's evaluation, collated."""
    from vlmkit.core.compose import IMAGE_TOKEN
    from vlmkit.core.data.collate import Collator
    from vlmkit.core.registry import get_registry

    alias = resolved.recipe.eval[0].model_extra["data"][0]
    spec = resolved.datasets[alias]
    record = get_registry().component_class("dataset", spec.name)(spec.config)[0]
    sample = model.templates[alias].render(record, model.decoder.tokenizer)
    batch = Collator(model.decoder.tokenizer, model.encoder.preprocess, IMAGE_TOKEN, model.placeholder_tokens)([sample])
    return {k: batch[k] for k in ("input_ids", "attention_mask", "vision_x", "media_mask")}


def _params(name):
    resolved = load_recipe(name, "paper")
    stages = stage_parameters(resolved)
    print(format_report(name, "paper", stages))  # per stage and component (pytest -s shows it)
    return dict(stages)


def _trainable(report):
    return {k: v["trainable"] for k, v in report.items()}


def test_otter_paper_trains_perceiver_cross_attention_and_embeddings_about_1_4b():
    stages = _params("otter_mimicit")
    instruct = _trainable(stages["instruct"])
    assert instruct["encoder"] == 0 and instruct["decoder"] == 0
    assert instruct["connector"] > 60e6 and instruct["fusion"] > 1e9
    assert instruct["embeddings"] == 2 * 32004 * 4096  # input and output tables of LLaMA-7B + 4 added tokens
    total = sum(instruct.values())
    assert 1.0e9 <= total <= 1.5e9
    print(f"otter_mimicit paper: {total:,} trainable parameters in stage instruct")


def test_paper_profiles_build_on_meta_with_the_published_sizes():
    llava = _params("llava")
    assert _trainable(llava["align"])["connector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu: 21M
    assert sum(_trainable(llava["align"]).values()) == _trainable(llava["align"])["connector"]
    assert _trainable(llava["instruct"])["decoder"] > 6.4e9
    lora = _params("llava_lora")
    assert 0 < _trainable(lora["instruct"])["decoder"] < 1e8
    owl = _params("mplug_owl")
    assert _trainable(owl["align"])["encoder"] > 3e8 and _trainable(owl["align"])["decoder"] == 0
    assert _trainable(owl["instruct"])["decoder"] == 32 * 2 * 8 * (4096 + 4096)  # LoRA r 8 on q_proj, v_proj
    assert _trainable(owl["instruct"])["connector"] == 0  # the released code's choice; the switch is a field
    blip2 = _params("blip2")
    assert _trainable(blip2["align"])["connector"] == pytest.approx(107.13e6, rel=1e-3)  # REFERENCE 1.4


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_paper_profiles_build_on_meta(name):
    stages = _params(name)
    assert all(sum(_trainable(r).values()) > 0 for r in stages.values())
