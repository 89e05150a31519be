"""Fuzzing what users feed the ``recipes`` command: every shipped recipe mutated at random (a field
deleted, or replaced by a value of the wrong type, a huge number, a string, a list, null, unicode,
deep nesting; a key misspelt), broken files (binary, truncated, flipped bytes, other encodings),
``--set`` values, and the named cases that once ended in a traceback.

Every input goes through the command line's ``main`` in-process (fast) and must end in exit code 0
or 2, never in an uncaught exception; an error is one message that starts with ``error:`` and names
the recipe file. Inputs that are certainly wrong (a number out of range, a misspelt key of a strict
section, nesting beyond the limit, a file that is not UTF-8 text) must be errors, not accepted.

Hypothesis runs derandomized (the same inputs on every run) with a fixed number of examples per
test, sized to keep the whole module within a minute. ``pytest -s`` prints the table of inputs by
kind at the end.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import io
import math
import os
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vlmkit.core.cli import main
from vlmkit.core.recipe.loader import shipped_recipes
from vlmkit.core.recipe.merge import REPLACE_TAG, ReplaceList, ReplaceMapping
from vlmkit.core.recipe.yaml_io import RecipeLoader

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402



class Dumper(yaml.SafeDumper):
    """Writes the ``!replace`` markers of the shipped recipes back."""


Dumper.add_representer(ReplaceMapping, lambda d, v: d.represent_mapping(REPLACE_TAG, dict(v)))
Dumper.add_representer(ReplaceList, lambda d, v: d.represent_sequence(REPLACE_TAG, list(v)))

RECIPES: dict[str, Path] = shipped_recipes()
BASES: dict[str, dict[str, Any]] = {
    name: yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeLoader)  # noqa: S506 - a safe loader
    for name, path in RECIPES.items()
}
TOY_TEXT = RECIPES["toy_prefix"].read_text(encoding="utf-8")



def examples(n: int) -> int:
    """``n`` examples; ``VLMKIT_FUZZ_SCALE=10`` fuzzes ten times as long (and
    ``VLMKIT_FUZZ_RANDOM=1`` draws new inputs on every run instead of the fixed ones)."""
    return max(1, int(n * float(os.environ.get("VLMKIT_FUZZ_SCALE", "1"))))


FUZZ = settings(
    derandomize=not os.environ.get("VLMKIT_FUZZ_RANDOM"),
    deadline=None,  # the first example of a test pays for imports
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    print_blob=False,
)

# ------------------------------------------------------------------------------ the outcome table
#: kind -> Counter(tried, error, accepted, traceback, silent)
TABLE: defaultdict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    kinds = sorted(TABLE)
    lines = [f"{'kind':<22}{'inputs':>8}{'errors':>8}{'accepted':>10}{'tracebacks':>12}{'silent':>8}"]
    total: Counter = Counter()
    for kind in kinds:
        c = TABLE[kind]
        total.update(c)
        lines.append(f"{kind:<22}{c['tried']:>8}{c['error']:>8}{c['accepted']:>10}{c['traceback']:>12}{c['silent']:>8}")
    lines.append(f"{'total':<22}{total['tried']:>8}{total['error']:>8}{total['accepted']:>10}{total['traceback']:>12}"
                 f"{total['silent']:>8}")
    print("\nfuzzed inputs by kind (silent: certainly wrong, yet accepted)\n" + "\n".join(lines))


# ------------------------------------------------------------------------------ running the CLI
@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    crash: str = ""  # the traceback of an uncaught exception


def cli(*args: str) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - exactly what this suite looks for
        return Outcome(None, out.getvalue(), err.getvalue(), traceback.format_exc())
    return Outcome(code, out.getvalue(), err.getvalue())


#: ``VLMKIT_FUZZ_KEEP_GOING=<file>``: a failure is appended to the file and the fuzzing goes on (for long
#: exploratory runs with ``VLMKIT_FUZZ_SCALE``); by default the first failure fails the test
KEEP_GOING = os.environ.get("VLMKIT_FUZZ_KEEP_GOING")


def _fail(message: str) -> None:
    if KEEP_GOING:
        with open(KEEP_GOING, "a", encoding="utf-8") as log:
            log.write(message + "\n=====\n")
        return
    pytest.fail(message)


def check(kind: str, outcome: Outcome, names: list[str], must_fail: bool, what: str) -> None:
    """Count ``outcome`` under ``kind`` and assert: no traceback, exit 0 or 2, an error message that
    starts with ``error:`` and names one of ``names`` (the file); an error where ``must_fail``."""
    row = TABLE[kind]
    row["tried"] += 1
    if outcome.crash or outcome.code not in (0, 2) or "Traceback (most recent call last)" in outcome.err:
        row["traceback"] += 1
        return _fail(f"{kind}: {what}: exit {outcome.code}, uncaught exception:\n{outcome.crash or outcome.err}")
    if outcome.code == 0:
        if must_fail:
            row["silent"] += 1
            return _fail(f"{kind}: {what}: accepted, but it is certainly wrong:\n{outcome.out}")
        row["accepted"] += 1
        return None
    row["error"] += 1
    text = outcome.err
    if not (text.startswith("error: ") and any(n in text for n in names) and outcome.out == ""):
        return _fail(f"{kind}: {what}: not one message that starts with 'error: ' and names {' or '.join(names)}:\n"
                     f"{text}{outcome.out}")
    return None


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write(folder: Path, name: str, data: Any) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ recipe mutations
Path_ = tuple[Any, ...]


def all_paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    found: list[Path_] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((*prefix, key))
            found += all_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.append((*prefix, i))
            found += all_paths(value, (*prefix, i))
    return found


PATHS: dict[str, list[Path_]] = {name: all_paths(data) for name, data in BASES.items()}


def get(data: Any, path: Path_) -> Any:
    for part in path:
        data = data[part]
    return data


#: mappings whose keys are the user's own names (dataset aliases, profile names): a renamed or new key
#: there is no typo the validator can know about
FREE_FORM_LEVEL = {"data", "profiles", "mix"}
#: options passed through unchecked at validation: timm's model_kwargs, and the component specs of the
#: LCL neighbours (validated when the dataset builds them)
FREE_FORM_SUBTREE = {"model_kwargs", "kwargs", "hf_config", "image_encoder", "text_decoder"}
#: numbers where any 64-bit value is fine
ANY_NUMBER = {"seed"}


def in_free_form(path: Path_) -> bool:
    """Whether the key at ``path`` is one the validator cannot know (see above)."""
    parent = path[:-1]
    return bool(parent and parent[-1] in FREE_FORM_LEVEL) or any(p in FREE_FORM_SUBTREE for p in parent)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


WRONG_TYPES: list[Any] = [None, True, False, 0, -1, 1.5, -0.0, "", "text", "null", "~", "${nope}", "${demo_data}",
                          [], [1, "a"], [[]], {}, {"x": 1}, {"name": 3}, {"": None}]
HUGE: list[Any] = [10**30, -(10**30), 2**63, 2**64 + 1, 10**4000, 1e300, -1e300, math.inf, -math.inf, math.nan,
                   10**15, 10**15 + 1, -(10**15) - 1, 2**31, 1e18, 1.0e16]
CERTAINLY_OUT_OF_RANGE = (10**30, -(10**30), 2**63, 2**64 + 1, 10**4000)

unicode_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40
) | st.sampled_from(["ünïcødé", "名前", "☃🦙", "\u202eevil", "e\u0301", "\u00a0", "a\tb", "line\nbreak", "'\"", "#x",
                     "- item", "key: value", "&anchor", "*alias", "!!python/object", "{", "]"])
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | unicode_text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(unicode_text, inner, max_size=4),
                      max_leaves=12)


@dataclass
class Mutation:
    recipe: str
    kind: str
    path: Path_
    value: Any = None
    must_fail: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        shown = repr(self.value)
        return f"{self.recipe}: {self.kind} at {'.'.join(map(str, self.path))} = {shown[:120]}"


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def typo(key: str, how: int) -> str:
    if len(key) < 3:
        return key + "x"
    i = 1 + how % (len(key) - 1)
    return key[:i] + key[i + 1 :] if how % 2 else key[:i] + key[i] + key[i:]


@st.composite
def mutations(draw: st.DrawFn, kinds: tuple[str, ...]) -> Mutation:
    recipe = draw(st.sampled_from(sorted(BASES)))
    data = copy.deepcopy(BASES[recipe])
    kind = draw(st.sampled_from(kinds))
    paths = PATHS[recipe]
    if kind == "huge_number":  # aimed at the numbers of the recipe
        numeric = [p for p in paths if is_number(get(data, p))]
        paths = numeric or paths
    elif kind == "typo_key":
        paths = [p for p in paths if isinstance(p[-1], str)]
    elif kind == "unknown_key":  # a new key in a mapping (the top level included)
        mappings = [()] + [p for p in paths if isinstance(get(data, p), dict)]
        where = draw(st.sampled_from(mappings))
        key = draw(unicode_text.filter(lambda k: k.strip() != ""))
        target = get(data, where)
        m = Mutation(recipe, kind, (*where, key), draw(scalars), data=data)
        m.must_fail = key not in target and not in_free_form((*where, key))
        target[key] = m.value
        return m
    path = draw(st.sampled_from(paths))
    *parents, last = path
    parent = get(data, tuple(parents))
    old = parent[last]
    m = Mutation(recipe, kind, path, data=data)
    if kind == "delete":
        del parent[last]
        return m
    if kind == "typo_key":
        new_key = typo(last, draw(st.integers(0, 50)))
        if new_key in parent:
            new_key += "_"
        parent[new_key] = parent.pop(last)
        m.value = new_key
        m.must_fail = not in_free_form(path)
        return m
    if kind == "wrong_type":
        m.value = draw(st.sampled_from(WRONG_TYPES))
    elif kind == "huge_number":
        m.value = draw(st.sampled_from(HUGE))
        certain = any(m.value is v or m.value == v for v in CERTAINLY_OUT_OF_RANGE) or (
            isinstance(m.value, float) and not math.isfinite(m.value)
        )
        # beyond 10^15 anywhere (the loader's bound), a seed aside
        m.must_fail = certain or (last not in ANY_NUMBER and abs(m.value) > 10**15)
    elif kind == "string":
        m.value = draw(unicode_text)
    elif kind == "list":
        m.value = draw(st.lists(scalars, max_size=5))
    elif kind == "null":
        m.value = None
    elif kind == "random_value":
        m.value = draw(values)
    elif kind == "nesting":
        depth = draw(st.integers(2, 70))
        m.value = nested(depth)
        m.must_fail = len(path) + depth > 50
    parent[last] = m.value
    return m


FIELD_KINDS = ("delete", "wrong_type", "huge_number", "string", "list", "null", "random_value", "nesting", "typo_key",
               "unknown_key")


def _validate_mutation(fuzz_dir: Path, m: Mutation) -> None:
    path = write(fuzz_dir, f"{m.recipe}-mutated", m.data)
    check(m.kind, cli("validate", path), [str(path)], m.must_fail, str(m))


@settings(FUZZ, max_examples=examples(220))
@given(m=mutations(FIELD_KINDS))
def test_mutated_recipes_validate_or_fail_clearly(fuzz_dir: Path, m: Mutation) -> None:
    _validate_mutation(fuzz_dir, m)


# ------------------------------------------------------------------------------ broken files
@st.composite
def broken_files(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    recipe = draw(st.sampled_from(sorted(RECIPES)))
    raw = RECIPES[recipe].read_bytes()
    kind = draw(st.sampled_from(("binary", "truncated", "byte_flip", "encoding", "yaml_noise")))
    if kind == "binary":
        return kind, draw(st.binary(min_size=1, max_size=400)) + b"\x00\xff", True
    if kind == "truncated":
        return kind, raw[: draw(st.integers(0, len(raw) - 1))], False
    if kind == "byte_flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 5))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return kind, bytes(data), False
    if kind == "encoding":
        encoding = draw(st.sampled_from(("utf-16", "utf-16-le", "utf-32", "latin-1+é", "utf-8-sig")))
        if encoding == "latin-1+é":
            return kind, ("# café\n" + raw.decode("utf-8")).encode("latin-1", "replace"), True
        return kind, raw.decode("utf-8").encode(encoding), encoding != "utf-8-sig"
    noise = draw(st.sampled_from(["[" * 5000, "{a: " * 3000, "- " * 3000, "a: &a [*a]", "a: *nope", ": : :",
                                  "\t- tab", "%YAML 9.9\n---\na: 1", "a: 1\n---\nb: 2", "? [a]\n: b", "a: !!binary x",
                                  "a: 2024-13-45", "<<: {a: 1}", "a: b\x07", "\ufeffname: x"]))
    return "yaml_noise", (noise + draw(st.text(max_size=20))).encode("utf-8"), False


@settings(FUZZ, max_examples=examples(70))
@given(case=broken_files())
def test_broken_files_fail_clearly(fuzz_dir: Path, case: tuple[str, bytes, bool]) -> None:
    kind, raw, must_fail = case
    path = fuzz_dir / "broken.yaml"
    path.write_bytes(raw)
    check(f"file:{kind}", cli("validate", path), [str(path)], must_fail, f"{kind}: {raw[:80]!r}")


# ------------------------------------------------------------------------------ --set overrides
@st.composite
def overrides(draw: st.DrawFn) -> tuple[str, str]:
    recipe = draw(st.sampled_from(["toy_prefix", "llava", "otter_mimicit", "llava_lora"]))
    path = draw(st.sampled_from([p for p in PATHS[recipe] if all(isinstance(x, (str, int)) for x in p)]))
    dotted = ".".join(map(str, path))
    value = draw(st.sampled_from(["1e300", "10000000000000000000000", "[[[[", "&a [*a]", "null", "{x: 1}", "-1",
                                  "\"\"", ".inf", "ünïcødé", "[" * 3000, "!!python/object:os.system x"]) | unicode_text)
    return recipe, f"{dotted}={value}"


@settings(FUZZ, max_examples=examples(40))
@given(case=overrides())
def test_set_overrides_fail_clearly(case: tuple[str, str]) -> None:
    recipe, text = case
    outcome = cli("show", recipe, "--set", text)
    check("set_override", outcome, [str(RECIPES[recipe]), "--set"], False, f"{recipe} --set {text!r}")


# ------------------------------------------------------------------------------ the named cases
BOMB = """
      lol:
        a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
        d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
        e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
        f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
        g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
        h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
        i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]"""


def toy_text(old: str, new: str) -> str:
    assert old in TOY_TEXT, old
    return TOY_TEXT.replace(old, new, 1)


#: (case, the file's bytes, what the one message must say)
NAMED: list[tuple[str, bytes, list[str]]] = [
    ("binary-garbage", bytes(range(256)) * 8, ["the file is binary", "UTF-8"]),
    ("binary-no-nul", b"\xd7\x91\xff\xfe\x80" * 100, ["not UTF-8 text", "byte 0xff at line 1, column 3", "UTF-8"]),
    ("utf16-bom", TOY_TEXT.encode("utf-16"), ["UTF-16", "byte-order mark", "save it as UTF-8"]),
    ("utf32-bom", TOY_TEXT.encode("utf-32"), ["UTF-32", "save it as UTF-8"]),
    ("nested-5000", ("name: x\nmodel: " + "[" * 5000).encode(), ["line 2", "nest too deep", "at most 50 levels"]),
    ("nested-60", ("name: x\nmodel: " + "[" * 60 + "]" * 60).encode(), ["line 2", "nest deeper than 50", "at most 50 levels"]),
    ("alias-chain", ("name: x\n" + "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 80))).encode(),
     ["nests 51 levels deep", "at most 50"]),
    ("recursive-alias", b"name: x\nmodel: &m {decoder: *m}\n", ["alias *m", "recursive"]),
    ("bomb-in-decoder-config", toy_text("      model_type: llama", "      model_type: llama" + BOMB).encode(),
     ["billion laughs", "at most 100,000 values", "line "]),
    ("bomb-top-level", (TOY_TEXT + BOMB.replace("\n      ", "\n")).encode(), ["billion laughs"]),
    ("heads-5", toy_text("num_attention_heads: 4", "num_attention_heads: 5").encode(),
     ["model.decoder.config", "not a multiple of the number of attention heads"]),
    ("lr-1e300", toy_text("lr: 3.0e-3", "lr: 1e300").encode(), ["stages.0.lr", "less than or equal to 1"]),
    ("lr-1.0e+300", toy_text("lr: 3.0e-3", "lr: 1.0e+300").encode(), ["line 36", "out of range", "10^15"]),
    ("lr-inf", toy_text("lr: 3.0e-3", "lr: .inf").encode(), ["line 36", "infinite"]),
    ("lr-string-inf", toy_text("lr: 3.0e-3", "lr: 'inf'").encode(), ["stages.0.lr", "finite number"]),
    ("hidden-size-1e9", toy_text("hidden_size: 64", "hidden_size: 1e9").encode(),
     ["model.decoder.config", "hidden_size", "write 1000000000"]),
    ("hidden-size-10^9", toy_text("hidden_size: 64", "hidden_size: 1000000000").encode(),
     ["model.decoder.config", "parameters", "at most 10^12 parameters"]),
    ("hidden-size-negative", toy_text("hidden_size: 64", "hidden_size: -64").encode(),
     ["model.decoder.config", "hidden_size", "at least 1"]),
    ("layers-10^12", toy_text("num_hidden_layers: 2", "num_hidden_layers: 1000000000000").encode(),
     ["model.decoder.config", "num_hidden_layers", "2147483647"]),
    ("num-samples-1e15", toy_text("num_samples: 64", "num_samples: 1e15").encode(), ["data.shapes.num_samples"]),
    ("num-samples-10^15", toy_text("num_samples: 64", "num_samples: 1000000000000000").encode(),
     ["data.shapes.num_samples", "less than or equal to 10000000"]),
    ("typo-in-decoder-config", toy_text("hidden_size: 64", "hiden_size: 64").encode(),
     ["model.decoder.config", "unknown key 'hiden_size'", "did you mean 'hidden_size'?", "intermediate_size"]),
    ("unknown-model-type", toy_text("model_type: llama", "model_type: lama").encode(),
     ["model.decoder.config", "model_type: 'lama'", "did you mean 'llama'?"]),
    ("max-steps-1e30", toy_text("max_steps: 30", "max_steps: 1e30").encode(), ["stages.0.max_steps"]),
    ("max-steps-1.0e+30", toy_text("max_steps: 30", "max_steps: 1.0e+30").encode(), ["line 38", "out of range"]),
    ("max-steps-10^30", toy_text("max_steps: 30", "max_steps: 1000000000000000000000000000000").encode(),
     ["line 38", "out of range", "between -10^15 and 10^15"]),
    ("max-steps-2*10^9", toy_text("max_steps: 30", "max_steps: 2000000000").encode(),
     ["stages.0.max_steps", "less than or equal to 1000000000"]),
    ("seed-10^19", toy_text("seed: 0", "seed: 1.0e+19").encode(), ["line 3", "a seed is a 64-bit integer"]),
    ("betas-1e300", toy_text("    lr: 3.0e-3", "    optimizer: {betas: [0.9, 1e300]}\n    lr: 3.0e-3").encode(),
     ["stages.0.optimizer.betas.1", "less than 1"]),
    ("perceiver-depth-10^12", toy_text("    name: mlp\n    projector: mlp2x_gelu", "    name: perceiver\n    depth: 1000000000000").encode(),
     ["model.connector.depth", "less than or equal to 1000"]),
    ("perceiver-latents-10^7", toy_text("    name: mlp\n    projector: mlp2x_gelu", "    name: perceiver\n    num_latents: 10000000").encode(),
     ["model.connector.num_latents", "less than or equal to 1000000"]),
    ("control-character", toy_text("name: toy_prefix", "name: toy\x07prefix").encode(), ["line 1", "control character"]),
    ("bad-date", toy_text("seed: 0", "seed: 2024-13-45").encode(), ["line 3", "looks like a date"]),
]


NAMED_KINDS = {"binary": "file", "utf16": "file", "utf32": "file", "control": "file", "bad": "file",
               "nested": "yaml-limits", "alias": "yaml-limits", "recursive": "yaml-limits", "bomb": "yaml-limits",
               "heads": "decoder-config", "hidden": "decoder-config", "layers": "decoder-config",
               "typo": "decoder-config", "unknown": "decoder-config"}


@pytest.mark.parametrize("case, raw, expected", NAMED, ids=[c[0] for c in NAMED])
def test_named_inputs_fail_with_one_clear_message(fuzz_dir: Path, case: str, raw: bytes, expected: list[str]) -> None:
    path = fuzz_dir / f"{case}.yaml"
    path.write_bytes(raw)
    outcome = cli("validate", path)
    check(f"named:{NAMED_KINDS.get(case.split('-')[0], 'bounds')}", outcome, [str(path)], True, case)
    message = outcome.err
    assert message.startswith(f"error: {path}: "), message
    assert len(message.strip().splitlines()) == 1, message  # one message, not a list of follow-on errors
    for part in expected:
        assert part in message, f"{case}: {part!r} not in: {message}"


def test_the_bomb_in_a_decoder_config_is_refused_at_once(fuzz_dir: Path) -> None:
    import time

    path = fuzz_dir / "bomb-timed.yaml"
    path.write_text(toy_text("      model_type: llama", "      model_type: llama" + BOMB), encoding="utf-8")
    start = time.perf_counter()
    outcome = cli("validate", path)
    assert outcome.code == 2 and "billion laughs" in outcome.err
    assert time.perf_counter() - start < 10  # it used to take 86 s and end in a MemoryError


# ------------------------------------------------------------------------------ building: memory
def _toy(fuzz_dir: Path) -> Any:
    from vlmkit.core.recipe.loader import load_recipe

    return load_recipe(RECIPES["toy_prefix"], "smoke")


def test_a_decoder_larger_than_memory_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch, fuzz_dir: Path) -> None:
    from vlmkit.core.compose import build_model
    from vlmkit.core.errors import RecipeError
    from vlmkit.decoders import hf_causal_lm

    monkeypatch.setattr(hf_causal_lm, "_physical_memory", lambda: 2**10)  # a machine of 1 KiB
    with pytest.raises(RecipeError) as err:
        build_model(_toy(fuzz_dir))
    text = f"error: {err.value}"
    TABLE["build:memory"]["tried"] += 1
    TABLE["build:memory"]["error"] += 1
    assert text.startswith(f"error: {RECIPES['toy_prefix']}: model.decoder.config: this model needs about "), text
    assert "for its weights alone" in text and "this machine has" in text and "hidden_size 64" in text


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 1032000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
], ids=["allocator", "MemoryError"])
def test_an_allocation_failure_while_building_names_the_memory_needed(
    monkeypatch: pytest.MonkeyPatch, fuzz_dir: Path, failure: BaseException
) -> None:
    from transformers import AutoModelForCausalLM

    from vlmkit.core.compose import build_model
    from vlmkit.core.errors import RecipeError

    real = AutoModelForCausalLM.from_config

    def from_config(*args: Any, **kwargs: Any) -> Any:
        if torch.get_default_device().type == "meta":  # the estimate in the error message is built on the meta device
            return real(*args, **kwargs)
        raise failure

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    with pytest.raises(RecipeError) as err:
        build_model(_toy(fuzz_dir))
    text = str(err.value)
    TABLE["build:allocator"]["tried"] += 1
    TABLE["build:allocator"]["error"] += 1
    assert text.startswith(f"{RECIPES['toy_prefix']}: model: building the model ran out of memory: this model needs "
                           "about "), text
    assert "encoder" in text and "decoder" in text and "make the model smaller" in text
    if isinstance(failure, RuntimeError):
        assert "the allocator reported: DefaultCPUAllocator: can't allocate memory" in text


def test_other_runtime_errors_while_building_are_not_disguised(monkeypatch: pytest.MonkeyPatch, fuzz_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from vlmkit.core.compose import build_model

    def from_config(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug, not a lack of memory")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    with pytest.raises(RuntimeError, match="a bug"):
        build_model(_toy(fuzz_dir))
