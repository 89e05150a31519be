"""No code from a shared model without consent: an export whose recipe says
``trust_remote_code: true`` is loaded only when the caller passes ``trust_remote_code=True`` /
``--trust-remote-code``; the export's own setting is never enough."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tiny import resolved_toy
from vlmkit.core.cli import main
from vlmkit.core.errors import VlmkitError


class _Reached(Exception):
    """transformers was asked to load the pretrained folder (stands in for loading it)."""


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory) -> Path:
    from vlmkit.core.compose import build_model
    from vlmkit.core.export import export_model

    tmp = tmp_path_factory.mktemp("export")
    resolved = resolved_toy(tmp)
    return export_model(build_model(resolved), resolved, tmp / "export")


def evil_export(plain: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of ``plain`` whose recipe loads its decoder from a folder that ships Python code
    (``auto_map``), with ``trust_remote_code: true``; the code would create ``ran.txt``."""
    import shutil

    marker = tmp_path / "ran.txt"
    model_dir = tmp_path / "shared_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "vlmkit_test_remote",
        "auto_map": {"AutoConfig": "payload.PayloadConfig", "AutoModelForCausalLM": "payload.PayloadModel"},
    }))
    (model_dir / "payload.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('the export ran its code')\n"
        "raise SystemExit('payload')\n"
    )
    export = tmp_path / "shared_export"
    shutil.copytree(plain, export)
    recipe_path = export / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    decoder = recipe["model"]["decoder"]
    decoder.pop("config")
    decoder.update(pretrained=str(model_dir), trust_remote_code=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return export, model_dir, marker


def test_load_refuses_remote_code_without_consent(plain_export: Path, tmp_path: Path) -> None:
    import vlmkit

    export, model_dir, marker = evil_export(plain_export, tmp_path)
    with pytest.raises(VlmkitError) as info:
        vlmkit.load(export)
    message = str(info.value)
    assert str(export / "recipe.yaml") in message
    assert f"model.decoder.trust_remote_code: true (pretrained: {model_dir})" in message
    assert "trust_remote_code=True" in message and "--trust-remote-code" in message
    assert not marker.exists()


def test_eval_refuses_remote_code_without_the_flag(plain_export: Path, tmp_path: Path, capsys) -> None:
    export, _, marker = evil_export(plain_export, tmp_path)
    code = main(["eval", str(export), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("error: ") and "model.decoder.trust_remote_code: true" in err and "--trust-remote-code" in err
    assert not marker.exists()


def test_consent_reaches_transformers(plain_export: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import transformers

    import vlmkit

    export, model_dir, marker = evil_export(plain_export, tmp_path)
    seen: list[tuple[str, object]] = []

    def from_pretrained(source, *args, **kwargs):
        seen.append((str(source), kwargs.get("trust_remote_code")))
        raise _Reached

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(_Reached):
        vlmkit.load(export, trust_remote_code=True)
    assert seen == [(str(model_dir), True)]
    with pytest.raises(_Reached):  # the CLI flag does the same
        main(["eval", str(export), "--no-progress", "--device", "cpu", "--trust-remote-code"])
    assert seen[-1] == (str(model_dir), True)
    assert not marker.exists()  # from_pretrained stood in: nothing ran here


def test_an_export_that_asks_for_nothing_loads_with_or_without_consent(plain_export: Path) -> None:
    import vlmkit

    assert not vlmkit.load(plain_export).training
    model = vlmkit.load(plain_export, trust_remote_code=True)  # consent given, nothing asked: nothing changes
    assert model.decoder.config.trust_remote_code is False


def test_remote_code_requests_are_found_in_any_component(plain_export: Path) -> None:
    from vlmkit.core.export import remote_code_requests
    from vlmkit.core.recipe.loader import validate_mapping

    data = yaml.safe_load((plain_export / "recipe.yaml").read_text(encoding="utf-8"))
    assert remote_code_requests(validate_mapping(data, "x")) == []
    data["model"]["decoder"]["trust_remote_code"] = True
    assert remote_code_requests(validate_mapping(data, "x")) == ["model.decoder.trust_remote_code: true"]


def test_eval_and_chat_document_the_flag(capsys) -> None:
    for command in ("eval", "chat"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--trust-remote-code" in text and "never enough" in text
