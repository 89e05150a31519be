"""Malformed recipes: every problem is reported at its exact dotted field path, with what is
allowed and a close-match suggestion; plus the merge semantics of extends / profiles / --set."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from vlmkit.core.errors import RecipeError, VlmkitError
from vlmkit.core.recipe.loader import load_recipe, shipped_recipes, validate_all_profiles

from vlmkit.core.registry import get_registry

TOY = shipped_recipes()["toy_prefix"]
CONNECTORS = ", ".join(get_registry().names("connector"))
assert "linear, mlp" in CONNECTORS
BASE: dict[str, Any] = yaml.safe_load(TOY.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ helpers
def _walk(data: Any, parts: list[str]) -> Any:
    for part in parts:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def setp(dotted: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets ``dotted`` (list items by index) to ``value``."""

    def mutate(d: dict) -> None:
        *parents, last = dotted.split(".")
        node = _walk(d, parents)
        if isinstance(node, list):
            node[int(last)] = copy.deepcopy(value)
        else:
            node[last] = copy.deepcopy(value)

    return mutate


def delp(dotted: str) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        *parents, last = dotted.split(".")
        node = _walk(d, parents)
        del node[int(last) if isinstance(node, list) else last]

    return mutate


def both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        for m in mutations:
            m(d)

    return mutate


def toy(*mutations: Callable[[dict], None]) -> dict:
    data = copy.deepcopy(BASE)
    both(*mutations)(data)
    return data


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Case:
    id: str
    start: str  # the problem starts with this: "<dotted.path>: " (or the fixed opening of a file-level problem)
    words: list[str]  # each appears in that problem
    mutate: Callable[[dict], None] | None = None
    text: str | None = None  # the recipe file's text, instead of a mutated toy_prefix
    extra_files: dict[str, Any] = field(default_factory=dict)  # other files next to it
    profile: str | None = None
    overrides: list[str] = field(default_factory=list)
    count: int = 1  # how many problems the recipe has in all


def at(path: str) -> str:
    return f"{path}: "


CASES = [
    # ---- unknown component names / dataset types, with a did-you-mean
    Case("connector-name", at("model.connector.name"), ["unknown connector 'mlpp'", "did you mean 'mlp'?", f"available: {CONNECTORS}"],
         setp("model.connector.name", "mlpp")),
    Case("encoder-name", at("model.encoder.name"), ["unknown encoder 'timn'", "did you mean 'timm'?"],
         setp("model.encoder.name", "timn")),
    Case("fusion-name", at("model.fusion.name"), ["unknown fusion 'prefx'", "did you mean 'prefix'?"],
         setp("model.fusion.name", "prefx")),
    Case("decoder-name", at("model.decoder.name"), ["unknown decoder 'hf_causal'", "did you mean 'hf_causal_lm'?"],
         setp("model.decoder.name", "hf_causal")),
    Case("dataset-type", at("data.shapes.type"), ["unknown dataset 'toy_caption'", "did you mean 'toy_captions'?"],
         setp("data.shapes.type", "toy_caption")),
    Case("component-name-missing", at("model.connector.name"), ["required field is missing"],
         setp("model.connector", {"projector": "mlp2x_gelu"})),
    # ---- typos in component options
    Case("connector-option-typo", at("model.connector.projectr"), ["unknown field 'projectr'", "did you mean 'projector'?", "bias"],
         both(delp("model.connector.projector"), setp("model.connector.projectr", "mlp2x_gelu"))),
    Case("encoder-option-typo", at("model.encoder.image_sise"), ["unknown field 'image_sise'", "did you mean 'image_size'?"],
         setp("model.encoder.image_sise", 32)),
    Case("decoder-option-typo", at("model.decoder.tokenizer_typ"), ["did you mean 'tokenizer_type'?"],
         setp("model.decoder.tokenizer_typ", "byte_level")),
    Case("dataset-option-typo", at("data.shapes.num_sample"), ["unknown field 'num_sample'", "did you mean 'num_samples'?"],
         setp("data.shapes.num_sample", 8)),
    # ---- bad option values
    Case("projector-pattern", at("model.connector.projector"), ["'mlp0x_gelu'", "mlpNx_gelu"],
         setp("model.connector.projector", "mlp0x_gelu")),
    Case("timm-model", at("model.encoder.model_name"),
         ["unknown timm model 'vit_tiny_patch16_22'", "did you mean 'vit_tiny_patch16_224'?"],
         setp("model.encoder.model_name", "vit_tiny_patch16_22")),
    Case("decoder-two-sources", at("model.decoder"), ["set exactly one source", "got config, pretrained"],
         setp("model.decoder.pretrained", "some/model")),
    Case("decoder-no-source", at("model.decoder"), ["set exactly one source", "'config'", "'pretrained'", "'gguf_file'"],
         delp("model.decoder.config")),
    Case("byte-level-with-tokenizer", at("model.decoder"), ["'tokenizer'", "byte_level"],
         setp("model.decoder.tokenizer", "gpt2")),
    Case("decoder-config-model-type", at("model.decoder"), ["needs 'model_type'"],
         delp("model.decoder.config.model_type")),
    Case("decoder-dtype", at("model.decoder.dtype"), ["got 'float33'", "did you mean 'float32'?", "'bfloat16'"],
         setp("model.decoder.dtype", "float33")),
    Case("dataset-option-range", at("data.shapes.image_size"), ["greater than or equal to 16", "(got 8)"],
         setp("data.shapes.image_size", 8)),
    # ---- schema: unknown and missing fields
    Case("top-level-unknown", at("stagez"), ["unknown field 'stagez'", "did you mean 'stages'?"],
         setp("stagez", [])),
    Case("model-section-typo", at("model.conector"), ["unknown field 'conector'", "did you mean 'connector'?"],
         both(setp("model.conector", {"name": "mlp"}), delp("model.connector")), count=2),
    Case("missing-model", at("model"), ["required field is missing"], delp("model")),
    Case("missing-data", at("data"), ["required field is missing"], delp("data")),
    Case("missing-stages", at("stages"), ["required field is missing"], delp("stages")),
    Case("missing-lr", at("stages.0.lr"), ["required field is missing"], delp("stages.0.lr")),
    Case("missing-batch-size", at("stages.0.batch_size"), ["required field is missing"], delp("stages.0.batch_size")),
    Case("missing-tune-decoder", at("stages.0.tune.decoder"), ["required field is missing"], delp("stages.0.tune.decoder")),
    Case("tune-typo", at("stages.1.tune.decodr"), ["unknown field 'decodr'", "did you mean 'decoder'?", "connector, decoder, embeddings, encoder, fusion"],
         both(delp("stages.1.tune.decoder"), setp("stages.1.tune.decodr", "full")), count=2),
    Case("stage-field-typo", at("stages.1.grad_acum"), ["unknown field 'grad_acum'", "did you mean 'grad_accum'?"],
         setp("stages.1.grad_acum", 2)),
    Case("optimizer-field-typo", at("stages.0.optimizer.weight_decy"), ["did you mean 'weight_decay'?"],
         setp("stages.0.optimizer", {"weight_decy": 0.1})),
    # ---- literals list what is allowed
    Case("precision", at("stages.0.precision"), ["got 'fp33'", "did you mean 'fp32'?", "allowed: 'fp32', 'bf16' or 'fp16'"],
         setp("stages.0.precision", "fp33")),
    Case("schedule", at("stages.1.schedule"), ["got 'cosin'", "did you mean 'cosine'?", "'constant', 'linear' or 'cosine'"],
         setp("stages.1.schedule", "cosin")),
    # the shorthand `encoder: frozn` is reported where it was written, the long form at its `mode`
    Case("tune-mode-shorthand", at("stages.0.tune.encoder"), ["got 'frozn'", "did you mean 'frozen'?", "'partial'"],
         setp("stages.0.tune.encoder", "frozn")),
    Case("tune-mode-mapping", at("stages.0.tune.encoder.mode"), ["got 'frozn'", "did you mean 'frozen'?"],
         setp("stages.0.tune.encoder", {"mode": "frozn"})),
    Case("optimizer-name", at("stages.0.optimizer.name"), ["got 'adam'", "did you mean 'adamw'?", "allowed: 'adamw'"],
         setp("stages.0.optimizer", {"name": "adam"})),
    Case("lr-per-component-key", at("stages.0.lr_per_component.conector"), ["did you mean 'connector'?"],
         setp("stages.0.lr_per_component", {"conector": 0.1})),
    # ---- stage rules
    Case("epochs-and-max-steps", at("stages.0"), ["set exactly one of 'epochs' and 'max_steps'"],
         setp("stages.0.epochs", 1)),
    Case("neither-epochs-nor-max-steps", at("stages.0"), ["set exactly one of 'epochs' and 'max_steps'"],
         delp("stages.0.max_steps")),
    Case("warmup-steps-and-ratio", at("stages.1"), ["set at most one of 'warmup_steps' and 'warmup_ratio'"],
         setp("stages.1.warmup_steps", 5)),
    Case("negative-lr", at("stages.0.lr"), ["greater than 0", "(got -0.1)"], setp("stages.0.lr", -0.1)),
    Case("zero-batch-size", at("stages.1.batch_size"), ["greater than 0"], setp("stages.1.batch_size", 0)),
    Case("lora-options-mode-full", at("stages.1.tune.decoder"), ["'lora' options need mode 'lora'", "mode is 'full'"],
         setp("stages.1.tune.decoder", {"mode": "full", "lora": {"r": 4}})),
    Case("lora-rank", at("stages.1.tune.decoder.lora.r"), ["greater than 0"],
         setp("stages.1.tune.decoder", {"mode": "lora", "lora": {"r": 0}})),
    Case("partial-without-modules", at("stages.1.tune.decoder"), ["mode 'partial' needs 'modules'", "'last_layers'"],
         setp("stages.1.tune.decoder", "partial")),
    Case("duplicate-stage-names", at("stages.1.name"), ["stage name 'align' is used twice", "also stages.0"],
         setp("stages.1.name", "align")),
    Case("stage-name-pattern", at("stages.0.name"), ["should match pattern"], setp("stages.0.name", "stage one")),
    Case("stage-data-alias", at("stages.0.data.0"), ["no dataset 'shapez'", "did you mean 'shapes'?", "defined: shapes"],
         setp("stages.0.data", ["shapez"])),
    Case("stage-data-empty", at("stages.0.data"), ["at least 1 item"], setp("stages.0.data", [])),
    Case("stage-data-not-list", at("stages.0.data"), ["valid list", "(got 'shapes')"], setp("stages.0.data", "shapes")),
    # ---- top-level values
    Case("recipe-name-pattern", at("name"), ["should match pattern '^[A-Za-z][A-Za-z0-9_.\\-]*$'", "(got '1 bad name')"],
         setp("name", "1 bad name")),
    Case("seed-type", at("seed"), ["valid integer", "(got 'abc')"], setp("seed", "abc")),
    Case("eval-unknown", at("eval.0.type"), ["unknown evaluator 'vqa'"], setp("eval", [{"type": "vqa"}])),
    Case("eval-without-type", at("eval.0.type"), ["required field is missing"], setp("eval", [{"split": "val"}])),
    # ---- profiles
    Case("unknown-profile", "profile 'smok' is not defined", ["did you mean 'smoke'?", "profiles: demo, smoke"],
         profile="smok"),
    Case("default-profile-undefined", at("default_profile"), ["'nope' is not defined", "profiles: demo, smoke"],
         setp("default_profile", "nope")),
    Case("profile-sets-name", at("profiles.smoke.name"), ["a profile cannot set 'name'"],
         setp("profiles.smoke.name", "other"), profile="smoke"),
    Case("profile-not-mapping", at("profiles.smoke"), ["expected a mapping"], setp("profiles.smoke", [1, 2]), profile="smoke"),
    Case("profile-overlay-error", at("stages.1.max_steps"), ["greater than 0"],
         setp("profiles.smoke.stages", [{"name": "instruct", "max_steps": 0}]), profile="smoke"),
    # ---- extends
    Case("extends-cycle", at("extends"), ["cycle", "recipe.yaml -> b.yaml -> recipe.yaml"],
         text="name: a\nextends: b.yaml\n", extra_files={"b.yaml": "name: b\nextends: recipe.yaml\n"}),
    Case("extends-missing-file", at("extends"), ["recipe file 'missing_parent.yaml' does not exist"],
         text="name: a\nextends: missing_parent.yaml\n"),
    Case("extends-unknown-name", at("extends"), ["unknown recipe 'toy_prefx'", "did you mean 'toy_prefix'?"],
         text="name: a\nextends: toy_prefx\n"),
    Case("extends-child-error", at("model.connector.name"), ["did you mean 'mlp'?"],
         text="name: child\nextends: toy_prefix\nmodel:\n  connector: {name: mlpp}\n"),
    # ---- the YAML itself
    Case("yaml-syntax", "line 3, column 6: ", ["invalid YAML", "mapping values are not allowed"],
         text="name: a\nseed: 0\n  bad: 1\nstages: []\n"),
    Case("yaml-duplicate-key", "line 3, column 1: ", ["duplicate key 'seed'"], text="name: a\nseed: 0\nseed: 1\n"),
    Case("empty-file", "the file is empty", ["mapping"], text="# nothing here\n"),
    Case("top-level-list", "a recipe must be a mapping", ["got a list"], text="- name: a\n- name: b\n"),
    # ---- --set overrides are validated like the file
    Case("set-bad-value", at("model.connector.projector"), ["'bad' is not of the form mlpNx_gelu"],
         overrides=["model.connector.projector=bad"]),
    Case("set-unknown-option", at("model.connector.num_latents"), ["unknown field 'num_latents'"],
         overrides=["model.connector.num_latents=32"]),
    Case("set-stage-by-name", at("stages.0.lr"), ["greater than 0", "(got -1)"], overrides=["stages.align.lr=-1"]),
    # ---- templates and dataset mixing
    Case("template-name", at("data.shapes.template"), ["unknown template 'llava_plane'", "did you mean 'llava_plain'?"],
         setp("data.shapes.template", "llava_plane")),
    Case("template-mapping-name", at("data.shapes.template.name"), ["unknown template 'otr'", "did you mean 'otter'?"],
         setp("data.shapes.template", {"name": "otr"})),
    Case("template-option-typo", at("data.shapes.template.separtor"), ["unknown field 'separtor'", "did you mean 'separator'?"],
         setp("data.shapes.template", {"name": "llava_plain", "separtor": " "})),
    Case("mix-weights-without-weight", at("data.shapes.weight"), ["mixes by weights", "stages.0.mix"],
         setp("stages.0.mix", "weights")),
    Case("max-length-zero", at("stages.0.max_length"), ["greater than 0"], setp("stages.0.max_length", 0)),
]


def _load_error(tmp_path: Path, case: Case) -> RecipeError:
    for name, content in case.extra_files.items():
        write(tmp_path / name, content)
    path = write(tmp_path / "recipe.yaml", case.text if case.text is not None else toy(case.mutate or (lambda d: None)))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, profile=case.profile, overrides=case.overrides)
    return info.value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_recipe(tmp_path: Path, case: Case) -> None:
    exc = _load_error(tmp_path, case)
    matching = [p for p in exc.problems if p.startswith(case.start)]
    assert matching, f"no problem starts with {case.start!r}: {exc.problems}"
    problem = matching[0]
    for word in case.words:
        assert word in problem, f"{word!r} not in {problem!r}"
    assert len(exc.problems) == case.count, exc.problems
    # the message names the file and carries the problem; no Python internals
    assert str(tmp_path) in exc.source
    assert problem in str(exc)
    assert "pydantic" not in str(exc) and "Traceback" not in str(exc)


def test_cases_are_many_and_distinct() -> None:
    assert len(CASES) >= 35
    assert len({c.id for c in CASES}) == len(CASES)


def test_problem_labels_the_profile(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", toy(setp("profiles.smoke.stages", [{"name": "instruct", "max_steps": 0}])))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, profile="smoke")
    assert info.value.source == f"{path} (profile smoke)"
    assert str(info.value).startswith(f"{path} (profile smoke): stages.1.max_steps: ")


# ------------------------------------------------------------------------------ several problems at once
def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    """Schema problems and component problems come out of one load, each at its path."""
    path = write(
        tmp_path / "r.yaml",
        toy(
            setp("stagez", []),
            setp("stages.0.precision", "fp33"),
            delp("stages.1.lr"),
            setp("model.connector.name", "mlpp"),
            setp("model.encoder.image_sise", 32),
            setp("data.shapes.type", "toy_caption"),
        ),
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = info.value.problems
    expected = [
        "stagez: ",
        "stages.0.precision: ",
        "stages.1.lr: ",
        "model.connector.name: ",
        "model.encoder.image_sise: ",
        "data.shapes.type: ",
    ]
    for start in expected:
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    assert len(problems) == len(expected)
    assert str(info.value).startswith(f"{path} (profile demo): 6 problems:\n")


def test_several_cross_reference_problems_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        toy(
            setp("model.decoder.name", "hf_causal"),
            setp("model.connector.projector", "mlp0x_gelu"),
            setp("stages.1.name", "align"),
            setp("stages.1.data", ["shapes", "shapez"]),
            setp("eval", [{"type": "vqa"}]),
        ),
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    starts = sorted(p.split(": ", 1)[0] for p in info.value.problems)
    assert starts == sorted(
        ["model.decoder.name", "model.connector.projector", "stages.1.name", "stages.1.data.1", "eval.0.type"]
    )


# ------------------------------------------------------------------------------ validate_all_profiles
def test_validate_all_profiles_ok() -> None:
    path, checked = validate_all_profiles("toy_prefix")
    assert path == TOY
    assert checked == ["(no profile)", "smoke", "demo"]


def test_validate_all_profiles_reports_a_recipe_problem_once(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", toy(setp("model.connector.name", "mlpp")))
    with pytest.raises(RecipeError) as info:
        validate_all_profiles(path)
    assert info.value.problems == [
        f"model.connector.name: unknown connector 'mlpp'; did you mean 'mlp'? available: {CONNECTORS}"
    ]
    assert str(info.value) == f"{path}: {info.value.problems[0]}"


def test_validate_all_profiles_reports_a_profile_problem_under_that_profile(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        toy(setp("profiles.smoke.stages", [{"name": "align", "max_steps": 0}]), setp("stages.1.schedule", "cosin")),
    )
    with pytest.raises(RecipeError) as info:
        validate_all_profiles(path)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{path}: stages.1.schedule: ")
    assert problems[1].startswith(f"{path} (profile smoke): stages.0.max_steps: ")


# ------------------------------------------------------------------------------ bad --set / recipe references
@pytest.mark.parametrize(
    "override, words",
    [
        ("model.connector.projector", ["expected PATH=VALUE"]),
        ("=3", ["expected PATH=VALUE"]),
        ("model..projector=mlp", ["expected PATH=VALUE"]),
        ("seed=[unclosed", ["not valid YAML"]),
        ("stages.nope.lr=1", ["stages.nope: no list entry 'nope'", "align", "instruct"]),
        ("stages.5.lr=1", ["no list entry '5'"]),
        ("seed.x=1", ["seed is a int value", "cannot set seed.x"]),
    ],
)
def test_bad_set_syntax(override: str, words: list[str]) -> None:
    with pytest.raises(VlmkitError) as info:
        load_recipe("toy_prefix", overrides=[override])
    assert not isinstance(info.value, RecipeError)
    assert f"--set '{override}'" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_unknown_recipe_reference() -> None:
    with pytest.raises(VlmkitError) as info:
        load_recipe("toy_prefx")
    assert "unknown recipe 'toy_prefx'; did you mean 'toy_prefix'?" in str(info.value)
    with pytest.raises(VlmkitError, match="recipe file 'nowhere/x.yaml' does not exist"):
        load_recipe("nowhere/x.yaml")


# ------------------------------------------------------------------------------ merge semantics
def test_extends_merges_nested_mappings(tmp_path: Path) -> None:
    child = write(
        tmp_path / "child.yaml",
        "name: child\nextends: toy_prefix\nmodel:\n  decoder:\n    config: {num_hidden_layers: 1}\n"
        "  encoder: {image_size: 48}\n",
    )
    resolved = load_recipe(child)
    decoder = resolved.data["model"]["decoder"]
    assert decoder["config"]["num_hidden_layers"] == 1
    assert decoder["config"]["hidden_size"] == 64  # kept from the parent
    assert decoder["tokenizer_type"] == "byte_level"
    assert resolved.components["encoder"].config.image_size == 48
    assert resolved.components["encoder"].config.model_kwargs["embed_dim"] == 32
    assert resolved.recipe.name == "child"
    assert resolved.data["stages"] == BASE["stages"]
    assert resolved.profile == "demo"  # the parent's default profile and profiles are inherited
    assert load_recipe(child, profile="smoke").recipe.stages[1].max_steps == 3


def test_extends_relative_path_chain(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", toy(setp("seed", 7)))
    write(tmp_path / "sub" / "mid.yaml", "name: mid\nextends: ../base.yaml\nseed: 8\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "name: leaf\nextends: mid.yaml\ndescription: leaf\n")
    resolved = load_recipe(leaf)
    assert (resolved.recipe.name, resolved.recipe.seed, resolved.recipe.description) == ("leaf", 8, "leaf")
    assert "extends" not in resolved.data


def test_component_with_another_name_replaces_the_section(tmp_path: Path) -> None:
    parent = write(tmp_path / "parent.yaml", toy(setp("model.connector", {"name": "mlp", "projector": "mlp3x_gelu", "bias": False})))
    child = write(tmp_path / "child.yaml", "name: child\nextends: parent.yaml\nmodel:\n  connector: {name: linear}\n")
    resolved = load_recipe(child)
    assert resolved.data["model"]["connector"] == {"name": "linear"}  # the mlp options are gone
    assert resolved.components["connector"].name == "linear"
    assert resolved.components["connector"].config.bias is True
    # the same name merges key by key instead
    same = write(tmp_path / "same.yaml", "name: same\nextends: parent.yaml\nmodel:\n  connector: {name: mlp, bias: true}\n")
    assert load_recipe(same).data["model"]["connector"] == {"name": "mlp", "projector": "mlp3x_gelu", "bias": True}


def test_dataset_with_another_type_replaces_the_entry() -> None:
    from vlmkit.core.recipe.merge import deep_merge

    merged = deep_merge({"d": {"type": "a", "x": 1}}, {"d": {"type": "b", "y": 2}})
    assert merged == {"d": {"type": "b", "y": 2}}
    assert deep_merge({"d": {"type": "a", "x": 1}}, {"d": {"type": "a", "y": 2}}) == {"d": {"type": "a", "x": 1, "y": 2}}


def test_stages_merge_by_name(tmp_path: Path) -> None:
    child = write(
        tmp_path / "child.yaml",
        "name: child\nextends: toy_prefix\nstages:\n"
        "  - {name: instruct, lr: 0.5}\n"
        "  - name: extra\n    data: [shapes]\n    tune: {encoder: full, connector: full, fusion: frozen, decoder: frozen}\n"
        "    lr: 1.0e-4\n    epochs: 1\n    batch_size: 4\n",
    )
    stages = load_recipe(child).recipe.stages
    assert [s.name for s in stages] == ["align", "instruct", "extra"]
    assert stages[0].lr == 3.0e-3
    assert stages[1].lr == 0.5
    assert (stages[1].schedule, stages[1].warmup_ratio, stages[1].max_steps) == ("cosine", 0.1, 30)
    assert stages[2].tune.encoder.mode == "full"


def test_profile_overlay() -> None:
    smoke = load_recipe("toy_prefix", profile="smoke")
    assert smoke.profile == "smoke"
    assert [s.max_steps for s in smoke.recipe.stages] == [3, 3]
    assert [s.lr for s in smoke.recipe.stages] == [3.0e-3, 1.0e-3]
    default = load_recipe("toy_prefix")
    assert default.profile == "demo"
    assert [s.max_steps for s in default.recipe.stages] == [30, 30]
    bare = load_recipe("toy_prefix", bare=True)
    assert bare.profile is None
    assert "profiles" not in bare.data and "default_profile" not in bare.data


@pytest.mark.parametrize("override", ["stages.align.lr=0.5", "stages.0.lr=0.5"])
def test_set_addresses_stages_by_name_or_index(override: str) -> None:
    resolved = load_recipe("toy_prefix", profile="smoke", overrides=[override])
    assert resolved.recipe.stages[0].lr == 0.5
    assert resolved.recipe.stages[1].lr == 1.0e-3
    assert resolved.recipe.stages[0].max_steps == 3
    assert resolved.overrides == [override]


def test_set_values_are_yaml() -> None:
    resolved = load_recipe(
        "toy_prefix",
        overrides=["model.connector.projector=mlp3x_gelu", "stages.instruct.tune.decoder={mode: lora, lora: {r: 4}}", "seed=5"],
    )
    assert resolved.components["connector"].config.depth == 3
    assert resolved.recipe.stages[1].tune.decoder.mode == "lora"
    assert resolved.recipe.stages[1].tune.decoder.lora.r == 4
    assert resolved.recipe.seed == 5


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    resolved = load_recipe("toy_prefix", profile="smoke", overrides=["stages.align.lr=0.5", "model.connector.projector=mlp3x_gelu"])
    text = resolved.to_yaml()
    assert text.startswith(f"# resolved from {TOY}, profile smoke, --set stages.align.lr=0.5 --set model.connector.projector=mlp3x_gelu\n")
    dumped = write(tmp_path / "resolved.yaml", text)
    again = load_recipe(dumped)
    assert again.data == resolved.data
    assert again.recipe == resolved.recipe
    assert again.recipe.stages[0].lr == 0.5 and again.recipe.stages[0].max_steps == 3
    assert again.to_yaml().split("\n", 1)[1] == text.split("\n", 1)[1]
