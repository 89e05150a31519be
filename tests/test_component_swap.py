"""A component swap is one line in every profile.

A child recipe (or a child's profile, or ``--set model.<kind>.name=X``) that names another
component drops the options that the layers below it (the parent's body and the parent's profiles
included) gave the old one; sizes that must differ between profiles derive from the wired widths.
Every registered connector and both fusions, swapped into ``otter_mimicit`` and ``llava`` with one
line, validate in every profile and train the smoke profile. The only combinations refused are
Otter's ``paper`` profile with a connector other than the perceiver or a fusion other than gated
cross-attention: that profile starts stage ``instruct`` from OpenFlamingo-9B, whose tensors fit only
those parts (the error says so and how to train from scratch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmkit.core.cli import main
from vlmkit.core.engine import run
from vlmkit.core.errors import RecipeError
from vlmkit.core.recipe.loader import load_recipe, validate_all_profiles
from vlmkit.core.recipe.merge import deep_merge, drop_swapped_components
from vlmkit.core.registry import get_registry

PARENTS = ("otter_mimicit", "llava")
CONNECTORS = tuple(get_registry().names("connector"))
FUSIONS = ("gated_cross_attention", "prefix")
SWAPS = [(p, "connector", c) for p in PARENTS for c in CONNECTORS] + [(p, "fusion", f) for p in PARENTS for f in FUSIONS]
OWN = {"otter_mimicit": {"connector": "perceiver", "fusion": "gated_cross_attention"},
       "llava": {"connector": "mlp", "fusion": "prefix"}}
# the swaps that change the parent's component (the others restate it: the parent's options stay)
REAL_SWAPS = [s for s in SWAPS if OWN[s[0]][s[1]] != s[2]]
PROFILES = {"otter_mimicit": ["demo", "demo_lora", "smoke", "paper"], "llava": ["demo", "smoke", "paper"]}
# (encoder width, decoder width) the profiles wire: a tiny ViT and Llama, EfficientNet-Lite0's last
# stage and SmolLM2-135M, CLIP ViT-L/14 and a 7B LLaMA
WIDTHS = {"smoke": (32, 64), "demo": (320, 576), "demo_lora": (320, 576), "paper": (1024, 4096)}
# a one-step train of one stage: the point is that the swapped model builds, runs and learns
TINY = ["run.eval_before=false", "eval=[]", "run.checkpoint_every=null", "stages.align.enabled=false",
        "stages.instruct.max_steps=1", "stages.instruct.batch_size=1"]
FROM_SCRATCH = ["stages.instruct.init_from=null", "stages.align.enabled=true"]


def child(tmp_path: Path, parent: str, kind: str, name: str) -> Path:
    path = tmp_path / f"{parent}_{name}.yaml"
    path.write_text(f"name: swap_{name}\nextends: {parent}\nmodel: {{{kind}: {{name: {name}}}}}\n", encoding="utf-8")
    return path


def refused(parent: str, kind: str, name: str, profile: str | None) -> bool:
    """Otter's paper profile loads OpenFlamingo-9B into its perceiver and gated cross-attention."""
    return parent == "otter_mimicit" and profile == "paper" and name != OWN[parent][kind]


def _ids(swaps: list[tuple[str, str, str]]) -> list[str]:
    return ["-".join(swap) for swap in swaps]


@pytest.mark.parametrize("parent, kind, name", SWAPS, ids=_ids(SWAPS))
def test_a_one_line_swap_validates_in_every_profile(parent, kind, name, tmp_path):
    path = child(tmp_path, parent, kind, name)
    if any(refused(parent, kind, name, p) for p in PROFILES[parent]):
        with pytest.raises(RecipeError) as info:
            validate_all_profiles(path)
        assert len(info.value.problems) == 1, info.value.problems  # the paper profile's init_from, nothing else
        assert str(info.value).startswith(f"{path} (profile paper): stages.1.init_from: format openflamingo")
        assert f"{kind} '{name}'" in str(info.value) and "stages.1.init_from: null" in str(info.value)
    else:
        _, checked = validate_all_profiles(path)
        assert checked == ["(no profile)", *PROFILES[parent]]
    for profile in PROFILES[parent]:
        overrides = FROM_SCRATCH if refused(parent, kind, name, profile) else []
        resolved = load_recipe(path, profile, overrides)
        assert resolved.components[kind].name == name
        parent_section = load_recipe(parent, profile).data["model"][kind]
        if name == OWN[parent][kind]:
            assert resolved.data["model"][kind] == parent_section  # a restated name keeps the parent's options
        else:
            assert resolved.data["model"][kind] == {"name": name}  # nothing of the old component followed
        if kind == "connector":
            _connector_builds_on_meta(resolved, profile)


def _connector_builds_on_meta(resolved, profile: str) -> None:
    """The connector of ``resolved`` at the widths ``profile`` wires (the decoder's for prefix tokens,
    the encoder's for gated cross-attention), built on the meta device."""
    width_in, decoder = WIDTHS[profile]
    width_out = width_in if resolved.components["fusion"].name == "gated_cross_attention" else decoder
    spec = resolved.components["connector"]
    config = spec.config.model_copy(update={"width_in": width_in, "width_out": width_out})
    with torch.device("meta"):
        connector = get_registry().component_class("connector", spec.name)(config)
    assert (connector.width_in, connector.width_out) == (width_in, width_out)
    hidden = {"qformer": lambda m: m.hparams.hidden_size, "abstractor": lambda m: m.config.hidden_size}
    if spec.name in hidden:
        # derived: the encoder width up to the paper size (BERT-base 768; mPLUG-Owl 1024)
        assert hidden[spec.name](connector) == min(width_in, 768 if spec.name == "qformer" else 1024)


@pytest.mark.parametrize("parent, kind, name", REAL_SWAPS, ids=_ids(REAL_SWAPS))
def test_a_one_line_swap_trains_its_smoke_profile(parent, kind, name, tmp_path):
    resolved = load_recipe(child(tmp_path, parent, kind, name), "smoke", TINY)
    result = run(resolved, tmp_path / "run", progress=False)
    assert [(s.name, s.steps) for s in result.stages] == [("instruct", 1)]
    assert all(torch.isfinite(torch.tensor(s.losses)).all() for s in result.stages)
    built = getattr(result.model, kind)
    assert type(built) is get_registry().component_class(kind, name)
    if name == "qformer":  # the smoke encoder's width, one head of 32, 4 x 32 feed-forward
        h = built.hparams
        assert (h.hidden_size, h.num_heads, h.intermediate_size, h.num_layers) == (32, 1, 128, 12)
    if name == "abstractor":  # likewise; LLaMA's rule gives a 256-wide SwiGLU
        c = built.config
        assert (c.hidden_size, c.num_heads, c.intermediate_size, c.num_layers) == (32, 1, 256, 6)


def test_paper_sizes_derived_from_a_paper_width_are_the_published_ones():
    with torch.device("meta"):
        registry = get_registry()
        qformer = registry.component_class("connector", "qformer")
        q = qformer(qformer.Config(width_in=1024, width_out=4096)).hparams
        abstractor = registry.component_class("connector", "abstractor")
        a = abstractor(abstractor.Config(width_in=1024, width_out=4096)).config
        demo = qformer(qformer.Config(width_in=320, width_out=576)).hparams
    assert (q.hidden_size, q.num_heads, q.intermediate_size, q.num_layers) == (768, 12, 3072, 12)  # BERT-base
    assert (a.hidden_size, a.num_heads, a.intermediate_size, a.num_layers) == (1024, 16, 2816, 6)  # mPLUG-Owl
    assert (demo.hidden_size, demo.num_heads, demo.intermediate_size) == (320, 5, 1280)


# ------------------------------------------------------------------------------ --set and the CLI
def test_set_name_swaps_the_component_through_the_cli(capsys):
    assert main(["validate", "otter_mimicit", "--set", "model.connector.name=qformer", "--profile", "smoke"]) == 0
    assert capsys.readouterr().out.strip().endswith("otter_mimicit.yaml (smoke)")
    for name in CONNECTORS:
        assert main(["validate", "llava", "--set", f"model.connector.name={name}", "--profile", "smoke"]) == 0
    # without --profile: the recipe bare and every profile; Otter's paper profile is refused
    assert main(["validate", "otter_mimicit", "--set", "model.connector.name=qformer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(profile paper): stages.1.init_from: format openflamingo" in err
    assert main(["validate", "otter_mimicit", "--set", "model.connector.name=qformer",
                 "--set", "stages.instruct.init_from=null", "--set", "stages.align.enabled=true"]) == 0
    assert main(["validate", "otter_mimicit", "--profile", "smok"]) == 2
    assert "profile 'smok' is not defined; did you mean 'smoke'?" in capsys.readouterr().err


def test_set_name_drops_the_old_options_and_later_sets_add_new_ones():
    resolved = load_recipe("otter_mimicit", "smoke", ["model.connector.name=qformer", "model.connector.num_queries=8"])
    assert resolved.data["model"]["connector"] == {"name": "qformer", "num_queries": 8}
    # the same name keeps the options (no swap)
    same = load_recipe("otter_mimicit", "smoke", ["model.connector.name=perceiver"])
    assert same.data["model"]["connector"]["num_latents"] == 4
    # a data entry's type swaps the same way
    swapped = load_recipe("llava", "smoke", ["data.captions.type=llava", "data.captions.path=x.json",
                                             "data.captions.image_folder=."])
    assert swapped.data["data"]["captions"] == {"type": "llava", "path": "x.json", "image_folder": "."}


# ------------------------------------------------------------------------------ the layer order
def test_the_issue_s_encoder_swap_is_one_line(tmp_path):
    """``model: {encoder: {name: X}}`` alone used to fail with ``model.encoder.model_name: unknown field``
    (the parent smoke profile's timm options merged into the new encoder); the child's body also
    outranks the parent's paper profile, which names another encoder (open_clip)."""
    path = tmp_path / "enc.yaml"
    path.write_text("name: enc\nextends: otter_mimicit\n"
                    "model: {encoder: {name: hf_vision, pretrained: openai/clip-vit-base-patch32}}\n", encoding="utf-8")
    for profile in ("smoke", "demo", "paper"):
        section = load_recipe(path, profile).data["model"]["encoder"]
        assert section == {"name": "hf_vision", "pretrained": "openai/clip-vit-base-patch32"}, profile


def test_a_child_profile_sizes_the_new_component_and_can_swap_again(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "name: parent\nextends: toy_prefix\nmodel: {connector: {name: perceiver, num_latents: 8, depth: 2}}\n"
        "profiles:\n  smoke: {model: {connector: {num_latents: 4, heads: 2, dim_head: 8}}}\n"
        "  paper: {model: {connector: {num_latents: 64}}}\n", encoding="utf-8")
    path = tmp_path / "child.yaml"
    path.write_text(
        "name: child\nextends: parent.yaml\nmodel: {connector: {name: qformer, num_layers: 2}}\n"
        "profiles:\n  smoke: {model: {connector: {num_queries: 4}}}\n"   # unnamed: for the child's qformer
        "  paper: {model: {connector: {name: perceiver, depth: 6}}}\n", encoding="utf-8")  # back again
    assert load_recipe(path, bare=True).data["model"]["connector"] == {"name": "qformer", "num_layers": 2}
    assert load_recipe(path, "smoke").data["model"]["connector"] == {"name": "qformer", "num_layers": 2, "num_queries": 4}
    # a swap at the child's profile drops every lower layer, the parent's perceiver options included
    assert load_recipe(path, "paper").data["model"]["connector"] == {"name": "perceiver", "depth": 6}
    # the parent's profiles still size its own perceiver, over the parent's body
    assert load_recipe(tmp_path / "parent.yaml", "smoke").data["model"]["connector"] == \
        {"name": "perceiver", "num_latents": 4, "depth": 2, "heads": 2, "dim_head": 8}
    # a child that restates the same name keeps the parent's profile options (no swap)
    same = tmp_path / "same.yaml"
    same.write_text("name: same\nextends: parent.yaml\nmodel: {connector: {name: perceiver, depth: 3}}\n", encoding="utf-8")
    assert load_recipe(same, "smoke").data["model"]["connector"] == \
        {"name": "perceiver", "num_latents": 4, "depth": 3, "heads": 2, "dim_head": 8}


def test_drop_swapped_components_keeps_the_layers_above_the_last_swap():
    layers = [{"model": {"connector": {"name": "perceiver", "depth": 2}}},       # parent body
              {"model": {"connector": {"depth": 1}}, "seed": 3},                 # parent profile
              {"model": {"connector": {"name": "qformer"}}},                     # child body: the swap
              {"model": {"connector": {"num_queries": 4}}}]                      # child profile
    kept = drop_swapped_components(layers)
    assert kept == [{"model": {}}, {"model": {}, "seed": 3}, layers[2], layers[3]]
    assert layers[0]["model"]["connector"] == {"name": "perceiver", "depth": 2}  # the input is not changed
    assert drop_swapped_components(layers[:2]) == layers[:2]


# ------------------------------------------------------------------------------ malformed stages
@pytest.mark.parametrize("text, where, got", [
    ("stages:\n  - {name: [align, instruct], lr: 0.1}\n", "stages.0.name", "list ['align', 'instruct']"),
    ("profiles:\n  smoke:\n    stages:\n      - {name: align, lr: 0.1}\n      - {name: 3}\n",
     "profiles.smoke.stages.1.name", "int 3"),
], ids=["list-in-the-body", "number-in-a-profile"])
def test_a_stage_name_that_is_not_a_string_is_a_recipe_error(tmp_path, capsys, text, where, got):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nextends: otter_mimicit\n" + text, encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {where}: got {got}; entries merge by name, so a name is one string")
    with pytest.raises(RecipeError, match=r"stages\.0\.name: got dict"):
        deep_merge({"stages": [{"name": "a"}]}, {"stages": [{"name": {"x": 1}}]})
