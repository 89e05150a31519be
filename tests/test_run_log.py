"""The engine's run log: metrics.jsonl, its truncation on resume, the loss-curve PNG and TensorBoard."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.core.engine import run_log as run_log_module
from vlmkit.core.engine.run_log import RunLog, loss_curve_data, loss_figure, read_metrics, stage_boundaries
from vlmkit.core.errors import VlmkitError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def records_for(stages: list[tuple[str, int]], log_every: int = 1) -> list[dict]:
    """What the engine logs for stages of these lengths: every log_every-th step and each stage's last."""
    out, offset = [], 0
    for index, (name, steps) in enumerate(stages):
        for step in range(1, steps + 1):
            if step % log_every == 0 or step == steps:
                global_step = offset + step
                out.append(
                    {
                        "stage": name,
                        "stage_index": index,
                        "step": step,
                        "global_step": global_step,
                        "loss": round(5.0 / global_step + 0.01 * index, 6),
                        "lr": 1e-3 * (index + 1),
                        "samples_per_s": 10.0 + step,
                    }
                )
        offset += steps
    return out


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_records_round_trip_one_line_each(tmp_path):
    records = records_for([("align", 3), ("instruct", 2)])
    log = RunLog(tmp_path / "run")
    for n, record in enumerate(records, 1):
        log.write(record)
        assert read_metrics(tmp_path / "run" / "metrics.jsonl") == records[:n]  # visible before close
    log.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert read_metrics(tmp_path / "run") == records  # the run folder works too


def test_numpy_and_torch_scalars_are_written_as_numbers(tmp_path):
    record = records_for([("align", 1)])[0] | {"loss": np.float32(0.5), "lr": torch.tensor(0.25), "step": np.int64(1)}
    with RunLog(tmp_path) as log:
        log.write(record)
    (back,) = read_metrics(tmp_path / "metrics.jsonl")
    assert back["loss"] == 0.5 and back["lr"] == 0.25 and back["step"] == 1
    assert type(back["step"]) is int


def test_each_write_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = RunLog(tmp_path)
    for record in records_for([("align", 3)]):
        log.write(record)
    assert len(synced) == 3


def test_a_record_missing_keys_or_with_wrong_types_is_refused(tmp_path):
    log = RunLog(tmp_path)
    record = records_for([("align", 1)])[0]
    with pytest.raises(ValueError, match="global_step"):
        log.write({k: v for k, v in record.items() if k != "global_step"})
    with pytest.raises(TypeError, match="'step'"):
        log.write(record | {"step": "1"})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_truncate_after_keeps_exactly_the_records_up_to_the_step(tmp_path):
    records = records_for([("align", 4), ("instruct", 4)], log_every=2)  # global steps 2, 4, 6, 8
    log = RunLog(tmp_path)
    for record in records:
        log.write(record)
    log.truncate_after(5)
    assert read_metrics(tmp_path / "metrics.jsonl") == [r for r in records if r["global_step"] <= 5]
    assert listing(tmp_path) == ["metrics.jsonl"]  # no temporary file left behind
    # the same log keeps appending after the cut, on a line of its own
    log.write(records[2])
    assert read_metrics(tmp_path / "metrics.jsonl") == records[:3]
    log.truncate_after(0)
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_resume_truncates_then_appends_without_duplicate_steps(tmp_path):
    records = records_for([("align", 3), ("instruct", 3)])
    first = RunLog(tmp_path)
    for record in records:
        first.write(record)
    first.close()
    resumed = RunLog(tmp_path)  # resumed from the checkpoint of global step 3
    resumed.truncate_after(3)
    for record in records[3:]:
        resumed.write(record | {"loss": record["loss"] + 1})
    resumed.close()
    back = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["global_step"] for r in back] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in back] == [r["loss"] for r in records[:3]] + [r["loss"] + 1 for r in records[3:]]


def test_truncate_after_is_atomic_when_the_replace_fails(tmp_path, monkeypatch):
    log = RunLog(tmp_path)
    for record in records_for([("align", 4)]):
        log.write(record)
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        log.truncate_after(1)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert listing(tmp_path) == ["metrics.jsonl"]


def test_a_partial_last_line_is_ignored_and_the_next_record_starts_a_new_line(tmp_path):
    records = records_for([("align", 3)])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + json.dumps(records[2])[:25])
    assert read_metrics(path) == records[:2]
    log = RunLog(tmp_path)  # a run resumed after the crash
    log.write(records[2])
    assert read_metrics(path) == records
    assert all(line.startswith("{") and line.endswith("}") for line in path.read_text().splitlines())


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    records = records_for([("align", 2)])
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(records[0]))
    assert read_metrics(path) == records[:1]
    RunLog(tmp_path).write(records[1])
    assert read_metrics(path) == records


def test_a_damaged_line_that_is_not_the_last_is_an_error(tmp_path):
    records = records_for([("align", 2)])
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(records[0]) + "\n{oops\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(VlmkitError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_a_missing_file_has_no_records(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_loss_curve_data_is_the_jsonl_per_stage():
    records = records_for([("align", 5), ("instruct", 4)], log_every=2)
    curves = loss_curve_data(records)
    assert list(curves) == ["align", "instruct"]
    assert curves["align"] == ([2, 4, 5], [records[i]["loss"] for i in range(3)])
    assert curves["instruct"] == ([7, 9], [records[3]["loss"], records[4]["loss"]])
    # the stage boundary is where stage 1 starts, even though global step 5 + 1 was not logged
    assert stage_boundaries(records) == [5]


def test_plot_writes_a_png_that_draws_exactly_the_jsonl(tmp_path, monkeypatch):
    records = records_for([("align", 6), ("instruct", 5), ("polish", 3)], log_every=2)
    log = RunLog(tmp_path)
    for record in records:
        log.write(record)
    drawn = []
    real = run_log_module.loss_figure
    monkeypatch.setattr(run_log_module, "loss_figure", lambda recs, **kw: drawn.append(recs) or real(recs, **kw))
    path = log.plot()
    assert path == tmp_path / "loss.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert drawn == [read_metrics(tmp_path / "metrics.jsonl")]
    assert listing(tmp_path) == ["loss.png", "metrics.jsonl"]

    figure = loss_figure(read_metrics(tmp_path / "metrics.jsonl"))
    (axes,) = figure.axes
    curves = loss_curve_data(records)
    lines = [line for line in axes.get_lines() if line.get_label() in curves]
    assert [line.get_label() for line in lines] == ["align", "instruct", "polish"]
    for line in lines:
        steps, losses = curves[line.get_label()]
        assert list(line.get_xdata()) == steps
        assert list(line.get_ydata()) == losses
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["align", "instruct", "polish"]
    verticals = [line for line in axes.get_lines() if line.get_label() not in curves]
    assert sorted(line.get_xdata()[0] for line in verticals) == [6, 11]
    assert all(line.get_xdata()[0] == line.get_xdata()[1] for line in verticals)


def test_plot_draws_the_file_not_what_this_log_wrote(tmp_path, monkeypatch):
    records = records_for([("align", 4)])
    writer = RunLog(tmp_path)
    for record in records:
        writer.write(record)
    writer.truncate_after(2)
    drawn = []
    real = run_log_module.loss_figure
    monkeypatch.setattr(run_log_module, "loss_figure", lambda recs, **kw: drawn.append(recs) or real(recs, **kw))
    assert RunLog(tmp_path).plot() == tmp_path / "loss.png"  # a log that wrote nothing itself
    assert drawn == [records[:2]]


def test_plot_without_records_returns_none_and_removes_a_stale_png(tmp_path):
    log = RunLog(tmp_path)
    assert log.plot() is None
    assert not (tmp_path / "loss.png").exists()
    log.write(records_for([("align", 1)])[0])
    assert log.plot() is not None
    log.truncate_after(0)
    assert log.plot() is None
    assert not (tmp_path / "loss.png").exists()


def test_close_draws_the_plot_and_is_idempotent(tmp_path):
    log = RunLog(tmp_path)
    log.write(records_for([("align", 2)])[0])
    log.close()
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.write(records_for([("align", 2)])[1])


def test_disabled_log_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not even needed when disabled
    run = tmp_path / "run"
    log = RunLog(run, tensorboard=True, enabled=False)
    for record in records_for([("align", 3)]):
        log.write(record)
    log.truncate_after(1)
    assert log.plot() is None
    log.close()
    assert not run.exists()
    assert listing(tmp_path) == []


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(VlmkitError, match=r"pip install 'vlmkit\[tensorboard\]'"):
        RunLog(tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()
    RunLog(tmp_path / "run").close()  # without TensorBoard the log works as ever


def test_tensorboard_scalars_per_stage_at_global_steps_and_purged_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = records_for([("align", 3), ("instruct", 3)])
    log = RunLog(tmp_path, tensorboard=True)
    for record in records:
        log.write(record)
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    def scalars() -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    got = scalars()
    expected_tags = {f"{stage}/{key}" for stage in ("align", "instruct") for key in ("loss", "lr", "samples_per_s")}
    assert set(got) == expected_tags
    for stage in ("align", "instruct"):
        mine = [r for r in records if r["stage"] == stage]
        for key in ("loss", "lr", "samples_per_s"):
            assert [s for s, _ in got[f"{stage}/{key}"]] == [r["global_step"] for r in mine]
            assert [v for _, v in got[f"{stage}/{key}"]] == pytest.approx([r[key] for r in mine], rel=1e-6)

    # resume from global step 4: TensorBoard forgets its events past it, like the JSONL
    resumed = RunLog(tmp_path, tensorboard=True)
    resumed.truncate_after(4)
    for record in records[4:]:
        resumed.write(record | {"loss": 100.0 + record["global_step"]})
    resumed.close()
    assert scalars()["instruct/loss"] == [(4, pytest.approx(records[3]["loss"])), (5, 105.0), (6, 106.0)]
