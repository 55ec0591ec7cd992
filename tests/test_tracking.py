"""RunTracker: metrics.jsonl in the trainers' format, TensorBoard scalars and hparams."""

import logging

import pytest

from training import common, tracking
from training.tracking import RunTracker


def records(n):
    return [
        {"epoch": e, "valid_nll": 10.0 - e, "lr": 1e-3, "best": e == n} for e in range(1, n + 1)
    ]


def test_jsonl_is_what_the_trainers_write(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tracking, "_summary_writer_class", lambda: None)  # no tensorboard
    with caplog.at_level(logging.INFO, logger="training.tracking"):
        tracker = RunTracker(tmp_path / "run", {"lr": 1e-3})
    assert "tensorboard is not installed" in caplog.text
    for r in records(3):
        tracker.log_epoch(r)
    tracker.close({"test_nll": 8.0})
    expected = tmp_path / "expected.jsonl"
    for r in records(3):
        common.append_jsonl(expected, r)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == expected.read_text()
    assert not (tmp_path / "run" / "tensorboard").exists()
    with pytest.raises(ValueError, match="epoch"):
        tracker.log_epoch({"valid_nll": 1.0})


def test_resume_keeps_checkpointed_epochs_and_a_fresh_run_starts_over(tmp_path):
    out = tmp_path / "run"
    tracker = RunTracker(out, tensorboard=False)
    for r in records(4):
        tracker.log_epoch(r)
    assert [r["epoch"] for r in RunTracker(out, resume_epoch=2, tensorboard=False).records] == [
        1,
        2,
    ]
    assert RunTracker(out, tensorboard=False).records == []


def test_scalars_and_hparams_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    hparams = {"lr": 2e-3, "model": {"gate": {"family": "bbeta5"}, "hidden_size": 148}}
    tracker = RunTracker(out, hparams)
    assert tracker.writer is not None
    for r in records(3):
        tracker.log_epoch({**r, "note": "text is not a scalar"})
    tracker.close({"test_nll": 8.25, "best_epoch": 3})
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) >= {"valid_nll", "lr"}
    assert "best" not in events.Tags()["scalars"]  # booleans are not plotted
    valid = events.Scalars("valid_nll")
    assert [(e.step, e.value) for e in valid] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert [e.value for e in events.Scalars("final/test_nll")] == [8.25]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    logged = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert logged["model.gate.family"].string_value == "bbeta5"
    assert logged["model.hidden_size"].number_value == 148
    assert tracking.hparam_values(hparams) == {
        "lr": 2e-3,
        "model.gate.family": "bbeta5",
        "model.hidden_size": 148,
    }
