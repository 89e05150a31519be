"""Nobody's files are overwritten: ``recipes run --output-dir`` refuses a folder that is not a vlmkit
run folder (``--overwrite`` moves aside, never deletes), an export never deletes files vlmkit did not
write, a resumed run leaves no temporaries behind, a rerun logs no step twice, and the data report
is printed once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny import toy_mapping, write_recipe
from vlmkit.core.cli import main

MARKER = ".vlmkit-run"


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` -> its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def toy_recipe(tmp_path: Path, name: str = "toy.yaml") -> Path:
    return write_recipe(tmp_path, toy_mapping(), name)


def run_cli(capsys, recipe: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["run", str(recipe), "--profile", "smoke", "--output-dir", str(out), "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def user_folder(path: Path) -> Path:
    """Someone's folder that happens to hold files of the names a run writes."""
    (path / "export").mkdir(parents=True)
    (path / "export" / "MY_FILE").write_bytes(b"my own bytes\x00\xff")
    (path / "recipe.yaml").write_text("my: own recipe\n", encoding="utf-8")
    (path / "metrics.jsonl").write_text('{"my": "own metrics"}\n', encoding="utf-8")
    (path / "notes.txt").write_text("keep me\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- refusal
def test_a_folder_that_is_not_a_run_folder_is_refused_and_untouched(tmp_path: Path, capsys) -> None:
    out = user_folder(tmp_path / "mine")
    before = snapshot(out)
    code, stdout, err = run_cli(capsys, toy_recipe(tmp_path), out)
    assert code == 2
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: --output-dir {out}: the folder is not empty and is not a vlmkit run folder")
    assert "--overwrite" in line
    assert snapshot(out) == before  # byte-identical, nothing added
    # a file is no folder
    afile = tmp_path / "a_file"
    afile.write_text("x")
    code, _, err = run_cli(capsys, toy_recipe(tmp_path), afile)
    assert code == 2 and "is a file, not a folder" in err and afile.read_text() == "x"


def test_overwrite_help_says_what_it_does(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in text and "renamed to <name>.pre-vlmkit-<time>" in text
    assert "Nothing there is deleted or changed" in text and "every other file is left alone" in text


# --------------------------------------------------------------- one run with --overwrite, reused
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A smoke run with --overwrite into someone's folder (a checkpoint after every step)."""
    tmp = tmp_path_factory.mktemp("overwrite")
    out = user_folder(tmp / "mine")
    before = snapshot(out)
    recipe = toy_recipe(tmp)
    code = main(["run", str(recipe), "--profile", "smoke", "--output-dir", str(out), "--no-progress", "--overwrite",
                 "--set", "run.checkpoint_every=1", "--set", "run.keep_last=100"])
    assert code == 0
    return recipe, out, before


def test_overwrite_moves_aside_and_deletes_nothing(reference) -> None:
    _, out, before = reference
    (aside_export,) = out.glob("export.pre-vlmkit-*")
    (aside_recipe,) = out.glob("recipe.yaml.pre-vlmkit-*")
    (aside_metrics,) = out.glob("metrics.jsonl.pre-vlmkit-*")
    assert (aside_export / "MY_FILE").read_bytes() == before["export/MY_FILE"]
    assert aside_recipe.read_bytes() == before["recipe.yaml"]
    assert aside_metrics.read_bytes() == before["metrics.jsonl"]
    assert (out / "notes.txt").read_bytes() == before["notes.txt"]  # not a run path: untouched in place
    # the run's own files
    marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    assert marker["format"] == "vlmkit-run" and marker["recipe"] == "toy_prefix" and marker["created"]
    assert [(r["stage"], r["step"]) for r in metrics(out)] == [("align", 1), ("align", 2), ("align", 3),
                                                                ("instruct", 1), ("instruct", 2), ("instruct", 3)]
    assert "name: toy_prefix" in (out / "recipe.yaml").read_text(encoding="utf-8")
    assert not (out / "export" / "MY_FILE").exists() and (out / "export" / "export.json").is_file()


def test_a_run_folder_is_used_again_without_overwrite(reference, tmp_path: Path, capsys) -> None:
    recipe, ref, _ = reference
    out = tmp_path / "again"
    shutil.copytree(ref, out)
    code, stdout, err = run_cli(capsys, recipe, out, "--set", "run.checkpoint_every=1", "--set", "run.keep_last=100")
    assert code == 0, err
    assert "already holds the finished run" in stdout


def test_a_run_folder_from_before_the_marker_is_still_a_run_folder(reference, tmp_path: Path, capsys) -> None:
    recipe, ref, _ = reference
    out = tmp_path / "legacy"
    shutil.copytree(ref, out)
    (out / MARKER).unlink()  # vlmkit before the marker: its checkpoints tell it is a run folder
    code, stdout, err = run_cli(capsys, recipe, out, "--set", "run.checkpoint_every=1", "--set", "run.keep_last=100")
    assert code == 0, err
    assert "already holds the finished run" in stdout
    assert (out / MARKER).is_file()


def test_resume_after_a_kill_leaves_no_temporaries(reference, tmp_path: Path, capsys) -> None:
    recipe, ref, _ = reference
    out = tmp_path / "killed"
    shutil.copytree(ref, out)
    # a kill -9 during the checkpoint of step 5: checkpoints up to 4, half-written temporaries beside them
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 4:
            shutil.rmtree(ckpt)
    shutil.rmtree(out / "export")
    (out / "loss.png").unlink()
    leftovers = [out / "checkpoints" / ".step-00000005.tmp-k2j4h1", out / ".export.tmp-a1b2c3", out / ".export.old-4242"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (out / ".metrics.jsonl.x8y7z6.tmp").write_text("half")
    (out / ".loss.png.q1w2e3.tmp").write_bytes(b"half")
    (out / "my.tmp-notes").write_text("mine")  # not vlmkit's pattern: kept
    code, _, err = run_cli(capsys, recipe, out, "--set", "run.checkpoint_every=1", "--set", "run.keep_last=100")
    assert code == 0, err
    hidden = sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name != MARKER)
    assert hidden == [], hidden
    assert (out / "my.tmp-notes").read_text() == "mine"
    assert [r["global_step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "export" / "export.json").is_file()


# ------------------------------------------------------------------------------------ exports
def test_export_folder_holding_someone_elses_files_is_refused_before_training(reference, tmp_path: Path, capsys) -> None:
    recipe, ref, _ = reference
    out = tmp_path / "resumable"
    shutil.copytree(ref, out)
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 4:
            shutil.rmtree(ckpt)
    shutil.rmtree(out / "export")
    (out / "export").mkdir()
    (out / "export" / "MINE.txt").write_text("mine")
    code, _, err = run_cli(capsys, recipe, out, "--set", "run.checkpoint_every=1", "--set", "run.keep_last=100")
    assert code == 2 and "Traceback" not in err
    assert f"cannot export to '{out / 'export'}': the folder holds files and is not a vlmkit export" in err
    assert (out / "export" / "MINE.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000004"  # nothing trained


def test_an_export_never_deletes_files_it_did_not_write(reference, tmp_path: Path) -> None:
    from vlmkit.core.errors import VlmkitError
    from vlmkit.core.export import export_model, load_with_recipe

    _, ref, _ = reference
    export = tmp_path / "export"
    shutil.copytree(ref / "export", export)
    (export / "README_MINE.md").write_text("my notes on this model\n", encoding="utf-8")
    (export / "extra").mkdir()
    (export / "extra" / "data.bin").write_bytes(b"\x01\x02")
    model, resolved = load_with_recipe(export)
    export_model(model, resolved, export)  # re-export over it
    assert (export / "README_MINE.md").read_text(encoding="utf-8") == "my notes on this model\n"
    assert (export / "extra" / "data.bin").read_bytes() == b"\x01\x02"
    assert not [p for p in export.iterdir() if p.name.startswith(".")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    load_with_recipe(export)  # still a complete export

    # a folder that is not an export and holds files: refused, untouched
    other = tmp_path / "someones"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not yours")
    with pytest.raises(VlmkitError, match=r"cannot export to '.*someones': the folder holds files and is not a vlmkit export"):
        export_model(model, resolved, other)
    assert snapshot(other) == {"model.safetensors": b"not yours"}


# ------------------------------------------------------------------------ metrics after a rerun
def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path: Path, capsys) -> None:
    recipe = toy_recipe(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    # what a kill after two logged steps, before the first checkpoint, leaves
    (out / MARKER).write_text(json.dumps({"format": "vlmkit-run", "recipe": "toy_prefix", "created": "x"}) + "\n")
    (out / "recipe.yaml").write_text("# the killed run's recipe\n")
    partial = [{"stage": "align", "stage_index": 0, "step": s, "global_step": s, "loss": 9.0, "lr": 0.1,
                "samples_per_s": 1.0} for s in (1, 2)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in partial))
    code, _, err = run_cli(capsys, recipe, out, "--set", "run.export=false")
    assert code == 0, err
    records = metrics(out)
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in records)  # the killed run's records are gone


# ------------------------------------------------------------------------------ the data report
def test_skip_report_is_printed_once(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    entries = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        entries.append({"id": f"c{i}", "image": f"{i}.png", "caption": f"picture number {i}"})
    entries.append({"id": "gone", "image": "missing.png", "caption": "no such picture"})
    entries.append({"id": "empty", "image": "0.png", "caption": " "})
    (data / "captions.json").write_text(json.dumps(entries), encoding="utf-8")
    mapping = toy_mapping()
    mapping["data"] = {"caps": {"type": "captions", "template": "llava_plain", "path": str(data / "captions.json")}}
    for stage in mapping["stages"]:
        stage["data"] = ["caps"]
        stage["batch_size"] = 3  # 9 usable records: 3 batches, one epoch per 3 steps
    mapping["profiles"]["smoke"]["stages"] = [{"name": "align", "max_steps": 3}, {"name": "instruct", "max_steps": 1}]
    recipe = write_recipe(tmp_path, mapping, "caps.yaml")
    code, stdout, err = run_cli(capsys, recipe, tmp_path / "run", "--set", "run.export=false")
    assert code == 0, err
    reports = [line for line in stdout.splitlines() if "skipped" in line]
    assert reports == ["stage align data: caps: captions captions.json: skipped 2 records (missing_image 1, "
                       "empty_answer 1): first ids gone, empty"], stdout
