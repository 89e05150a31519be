"""The plug-in registry for real: built-ins, entry points of installed distributions (faked with a
``*.dist-info`` folder on ``sys.path``), name clashes, broken plug-ins, strict mode, the
``VLMKIT_PLUGINS`` filter, lazy ``module:object`` references and the ``recipes`` CLI."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from vlmkit import hookimpl
from vlmkit.core.builtins import builtin_components
from vlmkit.core.errors import DuplicateComponentError, PluginError, RecipeError
from vlmkit.core.interfaces import INTERFACES, Dataset, DatasetConfig, EncoderConfig, Preprocess, VisionEncoder
from vlmkit.core.recipe.loader import load_recipe
from vlmkit.core.registry import PluginWarning, Provider, Registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "vlmkit-example-encoder"

# Components the fake plug-ins register; written as the module ``fakecomps`` next to them.
FAKE_COMPONENTS = '''
from vlmkit import Dataset, DatasetConfig, EncoderConfig, Preprocess, VisionEncoder


class FakeEncoder(VisionEncoder):
    """A fake encoder: one token, the mean pixel."""

    Config = EncoderConfig

    @property
    def width(self):
        return 3

    @property
    def preprocess(self):
        return Preprocess(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def num_tokens(self, image_size=None):
        return 1

    def forward(self, pixels):
        return pixels.mean((2, 3))[:, None, :]


class FakeDataset(Dataset):
    """A fake, empty dataset."""

    Config = DatasetConfig

    def __len__(self):
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


NOT_A_COMPONENT = 42
'''

GOOD_PLUGIN = """
from vlmkit import hookimpl


@hookimpl
def register_encoders(register):
    {encoder_import}register("{name}", {encoder})


@hookimpl
def register_datasets(register):
    register("{name}_data", "fakecomps:FakeDataset", summary="lazy fake data")
"""


class Site:
    """A folder on ``sys.path`` that holds fake installed distributions."""

    def __init__(self, root: Path):
        self.root = root

    def add(self, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str] = {}) -> None:
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[vlmkit]\n{lines}", encoding="utf-8")
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()

    def good(self, dist: str, version: str, ep: str, component: str, lazy: bool = False) -> None:
        """A working plug-in ``ep`` (module ``fake_<ep>``) registering encoder ``component`` (the
        class, or by reference when ``lazy``: then loading the plug-in does not import torch) and
        dataset ``<component>_data`` (by reference)."""
        module = f"fake_{ep}"
        self.add(dist, version, {ep: module}, {module: good_plugin(component, lazy)})


def good_plugin(name: str, lazy: bool = False) -> str:
    if lazy:
        return GOOD_PLUGIN.format(name=name, encoder_import="", encoder='"fakecomps:FakeEncoder", summary="A lazy fake."')
    return GOOD_PLUGIN.format(name=name, encoder_import="from fakecomps import FakeEncoder\n    ", encoder="FakeEncoder")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.delenv("VLMKIT_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("VLMKIT_PLUGINS", raising=False)
    root = tmp_path / "site"
    root.mkdir()
    (root / "fakecomps.py").write_text(FAKE_COMPONENTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    before = set(sys.modules)
    yield Site(root)
    for name in set(sys.modules) - before:
        if name.startswith("fake"):
            del sys.modules[name]
    importlib.invalidate_caches()


@contextlib.contextmanager
def no_plugin_warnings():
    """A context in which a PluginWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        yield


# ------------------------------------------------------------------------------------ built-ins
BUILTINS = [  # registry.yaml order, grouped by kind as the hooks register them
    ("encoder", "timm"),
    ("encoder", "open_clip"),
    ("encoder", "hf_vision"),
    ("connector", "linear"),
    ("connector", "mlp"),
    ("connector", "perceiver"),
    ("connector", "qformer"),
    ("connector", "abstractor"),
    ("fusion", "prefix"),
    ("fusion", "gated_cross_attention"),
    ("decoder", "hf_causal_lm"),
    ("dataset", "toy_captions"),
    ("dataset", "mimicit"),
    ("dataset", "llava"),
    ("dataset", "captions"),
    ("dataset", "text_only"),
    ("dataset", "lcl"),
    ("dataset", "class_folders"),
    ("template", "otter"),
    ("template", "llava_plain"),
    ("template", "vicuna_v1"),
    ("template", "mplug_owl"),
    ("template", "lcl"),
    ("template", "chat_template"),
    ("evaluator", "instructions"),
    ("evaluator", "image_use"),
    ("evaluator", "lcl"),
    ("evaluator", "lcl_false_ratio"),
    ("evaluator", "lcl_position"),
    ("evaluator", "fewshot"),
    ("llm_backend", "transformers"),
    ("llm_backend", "openai_compatible"),
]


def test_builtins_are_registered_by_vlmkit(monkeypatch):
    monkeypatch.delenv("VLMKIT_PLUGINS", raising=False)
    monkeypatch.delenv("VLMKIT_STRICT_PLUGINS", raising=False)
    reg = Registry(entry_points=False)
    version = md.version("vlmkit")
    for kind, name in BUILTINS:
        entry = reg.entry(kind, name)
        assert entry.provider == Provider("vlmkit", "vlmkit", version)
        assert entry.provider.describe() == "vlmkit (built-in)"
        assert entry.summary
    assert {(c.kind, c.name) for c in builtin_components()} == set(BUILTINS)
    info = reg.plugins["vlmkit"]
    assert info.status == "loaded" and info.error is None
    assert (info.distribution, info.version) == ("vlmkit", version)
    assert info.components == BUILTINS  # in registry.yaml order
    # registered by reference: nothing imported yet; loading gives a subclass of the interface
    assert all(isinstance(reg.entry(k, n).target, str) for k, n in BUILTINS)
    for kind, name in BUILTINS:
        assert issubclass(reg.component_class(kind, name), INTERFACES[kind])


def test_registry_without_builtins_is_empty():
    reg = Registry(entry_points=False, builtins=False)
    assert all(reg.names(kind) == [] for kind in INTERFACES)
    assert reg.plugins == {}


# ------------------------------------------------------------------------------------ entry points
def test_entry_point_plugin_is_registered_with_its_distribution(site):
    site.good("fakeplug", "1.0", "fakeplug", "fake_enc")
    with no_plugin_warnings():
        reg = Registry()
    entry = reg.entry("encoder", "fake_enc")
    assert entry.provider == Provider("fakeplug", "fakeplug", "1.0")
    assert entry.provider.describe() == "plug-in 'fakeplug' (distribution fakeplug 1.0)"
    assert entry.summary == "A fake encoder: one token, the mean pixel."
    cls = reg.component_class("encoder", "fake_enc")
    assert cls.__module__ == "fakecomps" and issubclass(cls, VisionEncoder)
    assert reg.entry("dataset", "fake_enc_data").provider.distribution == "fakeplug"
    info = reg.plugins["fakeplug"]
    assert (info.status, info.distribution, info.version) == ("loaded", "fakeplug", "1.0")
    assert info.hooks == ["register_datasets", "register_encoders"]
    assert info.components == [("encoder", "fake_enc"), ("dataset", "fake_enc_data")]
    # the built-ins are untouched and come first
    assert list(reg.plugins)[0] == "vlmkit"
    assert "timm" in reg.names("encoder")


def test_entry_point_plugin_is_not_found_without_its_dist_info(site):
    (site.root / "fake_orphan.py").write_text(good_plugin("orphan_enc"), encoding="utf-8")
    importlib.invalidate_caches()
    reg = Registry()
    assert "orphan_enc" not in reg.names("encoder")
    assert set(reg.plugins) >= {"vlmkit"} and "orphan" not in reg.plugins


def test_example_package_through_its_entry_point(site, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    site.add("vlmkit-example-encoder", "0.1.0", {"example_encoder": "vlmkit_example_encoder.plugin"})
    with no_plugin_warnings():
        reg = Registry()
    entry = reg.entry("encoder", "patch_embed")
    assert entry.provider == Provider("example_encoder", "vlmkit-example-encoder", "0.1.0")
    assert reg.plugins["example_encoder"].status == "loaded"
    assert reg.plugins["example_encoder"].components == [("encoder", "patch_embed")]
    cls = reg.component_class("encoder", "patch_embed")
    assert issubclass(cls, VisionEncoder) and cls.__name__ == "PatchEmbedEncoder"
    import torch

    enc = cls(cls.Config(patch_size=4, width=16, image_size=16))
    assert enc(torch.zeros(2, 3, 16, 16)).shape == (2, enc.num_tokens(), 16) == (2, 16, 16)


# ------------------------------------------------------------------------------------ name clashes
class EncoderPlugin:
    def __init__(self, name: str, component):
        self.name, self.component = name, component

    @hookimpl
    def register_encoders(self, register):
        register(self.name, self.component)


class LocalEncoder(VisionEncoder):
    """An encoder defined in the test module."""

    Config = EncoderConfig
    width = 3

    @property
    def preprocess(self):
        return Preprocess(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def num_tokens(self, image_size=None):
        return 1

    def forward(self, pixels):
        return pixels.mean((2, 3))[:, None, :]


class LocalDataset(Dataset):
    """A dataset defined in the test module."""

    Config = DatasetConfig

    def __len__(self):
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    with pytest.raises(DuplicateComponentError) as err:
        Registry(
            entry_points=False,
            plugins=[("first", EncoderPlugin("dup", LocalEncoder)), ("second", EncoderPlugin("dup", "x.y:Z"))],
        )
    msg = str(err.value)
    assert "encoder 'dup' is registered twice" in msg
    assert msg.index("plug-in 'first'") < msg.index("plug-in 'second'")  # in registration order
    assert isinstance(err.value, PluginError)


def test_a_plugin_shadowing_a_builtin_is_an_error_naming_both(site):
    site.add("shadow-dist", "2.0", {"shadow": "fake_shadow"}, {"fake_shadow": """
        from vlmkit import hookimpl

        @hookimpl
        def register_encoders(register):
            register("timm", "fakecomps:FakeEncoder")
    """})
    with pytest.raises(DuplicateComponentError) as err:
        Registry()
    msg = str(err.value)
    assert "encoder 'timm'" in msg
    assert "by vlmkit (built-in) and by plug-in 'shadow' (distribution shadow-dist 2.0)" in msg


def test_same_name_for_different_kinds_is_fine():
    class Both:
        @hookimpl
        def register_encoders(self, register):
            register("shared", LocalEncoder)

        @hookimpl
        def register_datasets(self, register):
            register("shared", LocalDataset)

    reg = Registry(entry_points=False, builtins=False, plugins=[("both", Both())])
    assert reg.component_class("encoder", "shared") is LocalEncoder
    assert reg.component_class("dataset", "shared") is LocalDataset


# ------------------------------------------------------------------------------------ broken plug-ins
BROKEN = {
    # entry point -> (distribution, module source, expected error text)
    "bimport": (
        "broken-import-dist",
        "import fake_missing_dependency\n",
        "failed to import 'fake_bimport': ModuleNotFoundError: No module named 'fake_missing_dependency'",
    ),
    "bhook": (
        "broken-hook-dist",
        """
        from vlmkit import hookimpl

        @hookimpl
        def register_encoders(register):
            register("half_registered", "fakecomps:FakeEncoder")
            raise RuntimeError("boom in the hook")
        """,
        "failed in register_encoders: RuntimeError: boom in the hook",
    ),
    "bnotcomp": (
        "not-a-component-dist",
        """
        from vlmkit import hookimpl
        from fakecomps import FakeDataset

        @hookimpl
        def register_encoders(register):
            register("wrong_kind", FakeDataset)
        """,
        "failed in register_encoders: PluginError: encoder 'wrong_kind':",
    ),
}


def add_broken(site: Site, which=BROKEN) -> None:
    for ep, (dist, source, _) in which.items():
        site.add(dist, "0.3", {ep: f"fake_{ep}"}, {f"fake_{ep}": source})


def test_broken_plugins_warn_and_everything_else_works(site):
    add_broken(site)
    site.good("fakeplug", "1.0", "fakeplug", "fake_enc")
    with pytest.warns(PluginWarning) as record:
        reg = Registry()
    messages = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(messages) == len(BROKEN)
    for ep, (dist, _, error) in BROKEN.items():
        [msg] = [m for m in messages if f"plug-in '{ep}'" in m]
        assert f"(distribution {dist} 0.3)" in msg and error in msg
        assert "VLMKIT_STRICT_PLUGINS" in msg
        info = reg.plugins[ep]
        assert (info.status, info.distribution, info.version) == ("failed", dist, "0.3")
        assert error in info.error
        assert info.components == []
    report = {p["name"]: p for p in reg.plugin_report()}
    assert report["bhook"]["status"] == "failed" and "boom in the hook" in report["bhook"]["error"]
    assert "is not a subclass of vlmkit.core.interfaces.VisionEncoder" in report["bnotcomp"]["error"]
    # what the hook registered before it raised is withdrawn; the others all work
    assert "half_registered" not in reg.names("encoder") and "wrong_kind" not in reg.names("encoder")
    assert report["fakeplug"]["status"] == "loaded"
    assert reg.component_class("encoder", "fake_enc").__name__ == "FakeEncoder"
    for kind, name in BUILTINS:
        assert reg.entry(kind, name).provider.plugin == "vlmkit"


def test_a_plugin_failing_in_a_later_hook_loses_all_its_components(site):
    site.add("late-fail", "1.1", {"late": "fake_late"}, {"fake_late": """
        from vlmkit import hookimpl

        @hookimpl
        def register_encoders(register):
            register("late_enc", "fakecomps:FakeEncoder")

        @hookimpl
        def register_datasets(register):
            raise ValueError("no data today")
    """})
    with pytest.warns(PluginWarning, match=r"plug-in 'late' \(distribution late-fail 1.1\) failed in register_datasets"):
        reg = Registry()
    assert "late_enc" not in reg.names("encoder")
    assert reg.plugins["late"].status == "failed" and reg.plugins["late"].components == []


@pytest.mark.parametrize(
    ("component", "error"),
    [
        ("42", "is not a subclass of vlmkit.core.interfaces.VisionEncoder"),
        ("type('Plain', (), {})", "is not a subclass of vlmkit.core.interfaces.VisionEncoder"),
        ("type('Abstract', (VisionEncoder,), {})", "does not implement"),
        ("type('Loose', (FakeEncoder,), {'Config': type('C', (BaseModel,), {})})", "must forbid unknown keys"),
        ("'no_colon_here'", "is not of the form 'module:object'"),
    ],
    ids=["object", "plain-class", "abstract", "loose-config", "bad-reference"],
)
def test_registering_a_non_component_fails_the_plugin(site, component, error):
    site.add("bad-comp", "0.1", {"badcomp": "fake_badcomp"}, {"fake_badcomp": f"""
        from pydantic import BaseModel
        from vlmkit import VisionEncoder, hookimpl
        from fakecomps import FakeEncoder

        @hookimpl
        def register_encoders(register):
            register("bad", {component})
    """})
    with pytest.warns(PluginWarning, match="distribution bad-comp 0.1") as record:
        reg = Registry()
    assert any(error in str(w.message) for w in record)
    assert "bad" not in reg.names("encoder")
    assert reg.plugins["badcomp"].status == "failed" and error in reg.plugins["badcomp"].error


@pytest.mark.parametrize("ep", list(BROKEN))
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_strict_mode_makes_a_broken_plugin_an_error(site, monkeypatch, ep, how):
    dist, _, error = BROKEN[ep]
    add_broken(site, {ep: BROKEN[ep]})
    if how == "environment":
        monkeypatch.setenv("VLMKIT_STRICT_PLUGINS", "1")
    with no_plugin_warnings(), pytest.raises(PluginError) as err:
        Registry(strict=True) if how == "argument" else Registry()
    msg = str(err.value)
    assert f"plug-in '{ep}' (distribution {dist} 0.3)" in msg and error in msg
    assert "strict plug-in mode" in msg


def test_strict_mode_accepts_working_plugins(site, monkeypatch):
    site.good("fakeplug", "1.0", "fakeplug", "fake_enc")
    monkeypatch.setenv("VLMKIT_STRICT_PLUGINS", "1")
    with no_plugin_warnings():
        reg = Registry()
    assert reg.strict and "fake_enc" in reg.names("encoder")
    assert not Registry(strict=False).strict  # the argument wins over the environment


TYPO_PLUGIN = """
from vlmkit import hookimpl

@hookimpl
def register_encodrs(register):
    register("typo_enc", "fakecomps:FakeEncoder")
"""


def test_a_hook_that_does_not_exist_warns_and_fails_in_strict_mode(site):
    site.add("typo-dist", "0.2", {"typo": "fake_typo"}, {"fake_typo": TYPO_PLUGIN})
    with pytest.warns(PluginWarning, match="did you mean 'register_encoders'") as caught:
        reg = Registry()
    assert any("plug-in 'typo' (distribution typo-dist 0.2)" in str(w.message) for w in caught)
    info = reg.plugins["typo"]
    assert info.status == "loaded" and info.hooks == ["register_encodrs"] and info.components == []
    assert "typo_enc" not in reg.names("encoder")
    with pytest.raises(PluginError, match="register_encodrs") as err:
        Registry(strict=True)
    assert "strict plug-in check failed" in str(err.value)
    assert "plug-in 'typo' (distribution typo-dist 0.2)" in str(err.value)


# ------------------------------------------------------------------------------------ VLMKIT_PLUGINS
@pytest.fixture
def two_plugins(site):
    site.good("dist-a", "1.0", "a", "enc_a")
    site.good("dist-b", "2.0", "b", "enc_b")
    add_broken(site, {"bimport": BROKEN["bimport"]})
    return site


@pytest.mark.parametrize(
    ("allow", "loaded"),
    [("a", {"a"}), ("dist-b", {"b"}), (" a , dist-b ", {"a", "b"}), ("nothing-by-this-name", set())],
)
def test_vlmkit_plugins_restricts_the_third_party_plugins(two_plugins, monkeypatch, allow, loaded):
    monkeypatch.setenv("VLMKIT_PLUGINS", allow)
    with no_plugin_warnings():  # the broken plug-in is not allowed, so never imported
        reg = Registry()
    assert "fake_bimport" not in sys.modules
    for ep in ("a", "b", "bimport"):
        info = reg.plugins[ep]
        if ep in loaded:
            assert info.status == "loaded"
            assert f"enc_{ep}" in reg.names("encoder")
        else:
            assert (info.status, info.error) == ("skipped", "not in VLMKIT_PLUGINS")
            assert info.components == [] and f"enc_{ep}" not in reg.names("encoder")
            assert f"fake_{ep}" not in sys.modules
    assert reg.plugins["b"].distribution == "dist-b" and reg.plugins["b"].version == "2.0"
    assert reg.plugins["vlmkit"].status == "loaded" and "timm" in reg.names("encoder")  # built-ins always load


def test_allow_argument_overrides_the_environment(two_plugins, monkeypatch):
    monkeypatch.setenv("VLMKIT_PLUGINS", "a")
    reg = Registry(allow=["b"])
    assert reg.plugins["a"].status == "skipped" and reg.plugins["b"].status == "loaded"


# ------------------------------------------------------------------------------------ lazy references
LAZY_PLUGIN = """
from vlmkit import hookimpl

@hookimpl
def register_encoders(register):
    register("lazy_enc", "fake_lazy_target:LazyEncoder")
    register("missing_module", "fake_lazy_missing:Nope", summary="its module does not exist")
    register("missing_object", "fake_lazy_target:LazyEncodr")
    register("not_component", "fake_lazy_target:NOT_A_COMPONENT")
"""

LAZY_TARGET = '''
from fakecomps import FakeEncoder, NOT_A_COMPONENT


class LazyEncoder(FakeEncoder):
    """Imported on first use only."""
'''


@pytest.fixture
def lazy_registry(site):
    site.add("lazyplug", "1.0", {"lazyplug": "fake_lazyplug"}, {"fake_lazyplug": LAZY_PLUGIN, "fake_lazy_target": LAZY_TARGET})
    with no_plugin_warnings():
        return Registry()


def test_a_reference_is_imported_on_first_use(lazy_registry):
    reg = lazy_registry
    assert "fake_lazy_target" not in sys.modules
    entry = reg.entry("encoder", "lazy_enc")
    assert entry.target == entry.reference == "fake_lazy_target:LazyEncoder"
    assert entry.summary == ""  # a reference has no docstring to read until it is imported
    assert reg.entry("encoder", "missing_module").summary == "its module does not exist"
    assert reg.plugins["lazyplug"].status == "loaded"
    cls = reg.component_class("encoder", "lazy_enc")
    assert "fake_lazy_target" in sys.modules
    assert cls is sys.modules["fake_lazy_target"].LazyEncoder
    assert entry.config_class is EncoderConfig
    assert reg.component_class("encoder", "lazy_enc") is cls


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("missing_module", "could not be imported from 'fake_lazy_missing:Nope': ModuleNotFoundError"),
        ("missing_object", "could not be imported from 'fake_lazy_target:LazyEncodr': AttributeError"),
        ("not_component", "is not a subclass of vlmkit.core.interfaces.VisionEncoder"),
    ],
)
def test_a_broken_reference_names_its_provider_when_used(lazy_registry, name, error):
    with pytest.raises(PluginError) as err:
        lazy_registry.component_class("encoder", name)
    msg = str(err.value)
    assert f"encoder '{name}'" in msg and error in msg
    assert "plug-in 'lazyplug' (distribution lazyplug 1.0)" in msg
    # the other components are not affected
    assert lazy_registry.component_class("encoder", "lazy_enc").__name__ == "LazyEncoder"


def test_a_broken_reference_is_a_recipe_problem_naming_the_provider(lazy_registry):
    with pytest.raises(RecipeError) as err:
        load_recipe("toy_prefix", "smoke", ["model.encoder.name=missing_module"], registry=lazy_registry)
    [problem] = err.value.problems
    assert problem.startswith("model.encoder.name: encoder 'missing_module' from plug-in 'lazyplug' (distribution lazyplug 1.0)")


# ------------------------------------------------------------------------------------ the CLI
def cli(*args: str, path: list[Path] = (), env: dict[str, str] | None = None, cwd: Path | None = None,
        command: list[str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VLMKIT_")}
    pythonpath = [str(p) for p in path] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else [])
    if pythonpath:
        full_env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    full_env.update(env or {})
    command = command or [sys.executable, "-m", "vlmkit.core.cli"]
    return subprocess.run([*command, *args], env=full_env, cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_plugins_json_lists_the_entry_point_plugin(site):
    site.good("fakeplug", "1.0", "fakeplug", "fake_enc", lazy=True)
    proc = cli("plugins", "--json", path=[site.root])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = {p["name"]: p for p in json.loads(proc.stdout)}
    assert report["fakeplug"] == {
        "name": "fakeplug",
        "distribution": "fakeplug",
        "version": "1.0",
        "status": "loaded",
        "error": None,
        "hooks": ["register_datasets", "register_encoders"],
        "components": [{"kind": "encoder", "name": "fake_enc"}, {"kind": "dataset", "name": "fake_enc_data"}],
    }
    assert report["vlmkit"]["distribution"] == "vlmkit" and len(report["vlmkit"]["components"]) == len(BUILTINS)

    proc = cli("components", "encoder", path=[site.root])
    assert proc.returncode == 0, proc.stderr
    assert "fake_enc" in proc.stdout and "plug-in 'fakeplug' (distribution fakeplug 1.0)" in proc.stdout


def test_cli_broken_plugin_only_warns(site):
    add_broken(site, {"bhook": BROKEN["bhook"]})
    site.good("fakeplug", "1.0", "fakeplug", "fake_enc", lazy=True)
    proc = cli("plugins", path=[site.root])
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "broken-hook-dist" in proc.stderr and "boom in the hook" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "failed: failed in register_encoders: RuntimeError: boom in the hook" in proc.stdout
    assert "fake_enc" in proc.stdout

    proc = cli("plugins", "--json", path=[site.root])
    assert proc.returncode == 0
    report = {p["name"]: p for p in json.loads(proc.stdout)}  # warnings go to stderr, stdout stays JSON
    assert report["bhook"]["status"] == "failed" and report["fakeplug"]["status"] == "loaded"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["plugins", "--strict-plugins"], {}),
        (["--strict-plugins", "plugins"], {}),
        (["plugins"], {"VLMKIT_STRICT_PLUGINS": "1"}),
    ],
    ids=["after-command", "before-command", "environment"],
)
def test_cli_strict_plugins_exits_2_without_a_traceback(site, args, env):
    add_broken(site, {"bimport": BROKEN["bimport"]})
    proc = cli(*args, path=[site.root], env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: plug-in 'bimport' (distribution broken-import-dist 0.3) failed to import")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "warning:" not in proc.stderr


def test_cli_name_clash_exits_2_naming_both_providers(site):
    site.good("dist-a", "1.0", "a", "same_enc", lazy=True)
    site.good("dist-b", "2.0", "b", "same_enc", lazy=True)
    proc = cli("components", path=[site.root])
    assert proc.returncode == 2
    assert "(distribution dist-a 1.0)" in proc.stderr and "(distribution dist-b 2.0)" in proc.stderr
    assert "Traceback" not in proc.stderr
    # restricting to one of them resolves it
    proc = cli("components", "encoder", path=[site.root], env={"VLMKIT_PLUGINS": "dist-b"})
    assert proc.returncode == 0 and "distribution dist-b 2.0" in proc.stdout


# ------------------------------------------------------------------------------------ a real install
@pytest.mark.slow
def test_pip_installed_example_package(tmp_path):
    # build from a copy, so that the build leaves no build/ or *.egg-info in the source tree
    source = tmp_path / "src-copy"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    target = tmp_path / "target"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / "vlmkit_example_encoder" / "plugin.py").is_file()

    script = Path(sys.executable).with_name("recipes")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "vlmkit.core.cli"]
    proc = cli("plugins", "--json", path=[target], command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = {p["name"]: p for p in json.loads(proc.stdout)}
    assert report["example_encoder"]["distribution"] == "vlmkit-example-encoder"
    assert report["example_encoder"]["version"] == "0.1.0"
    assert report["example_encoder"]["status"] == "loaded"
    assert report["example_encoder"]["components"] == [{"kind": "encoder", "name": "patch_embed"}]

    out = tmp_path / "run"
    proc = cli("run", str(EXAMPLE / "recipe.yaml"), "--profile", "smoke", "--output-dir", str(out), "--no-progress",
               path=[target], command=command, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "stage align: 3 steps" in proc.stdout and "stage instruct: 3 steps" in proc.stdout
    assert "name: patch_embed" in (out / "recipe.yaml").read_text(encoding="utf-8")
    assert "Traceback" not in proc.stderr
