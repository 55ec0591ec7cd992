"""The training-loop skeleton (training.loop): best epoch, early stop, checkpoints, resume,
callbacks — with a toy trainer whose scores are scripted."""

from __future__ import annotations

import json

import pytest
import torch

from bbservice import checkpoints
from training import common
from training.loop import Best, Callback, TrainingLoop, Validation
from training.options import TrainConfig


class Toy(TrainingLoop):
    """Scores from a list; a one-weight model whose weight is the epoch number."""

    def __init__(self, cfg, scores, resume=False, callbacks=()):
        super().__init__(cfg, common.Distributed(), torch.device("cpu"), resume, callbacks)
        self.scores = scores
        self.model = torch.nn.Linear(1, 1, bias=False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer)
        self.trained = []

    def train_epoch(self, epoch):
        self.trained.append(epoch)
        with torch.no_grad():
            self.model.weight.fill_(epoch)
        return {"train_loss": float(epoch)}

    def validate(self, epoch, train):
        score = self.scores[epoch - 1]
        return Validation(score, {"epoch": epoch, "valid": score, **train})

    def checkpoint_config(self, epoch, record):
        return {"kind": "toy", "metrics": {"epoch": epoch}}


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_epoch_end(self, loop, epoch, result, improved):
        self.events.append((epoch, improved))

    def on_train_end(self, loop, summary):
        self.events.append(("end", summary["best_epoch"]))


def test_best_tracks_min_and_max():
    low, high = Best("min"), Best("max")
    assert [low.update(e, s) for e, s in enumerate([3.0, 2.0, 2.5], 1)] == [True, True, False]
    assert (low.epoch, low.score, low.epochs_without_gain) == (2, 2.0, 1)
    assert [high.update(e, s) for e, s in enumerate([1.0, 0.5], 1)] == [True, False]


def test_checkpoints_log_and_early_stop(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=10, early_stop=2, lr=0.1)
    recorder = Recorder()
    summary = Toy(cfg, [5.0, 4.0, 4.5, 4.2, 1.0], callbacks=[recorder]).fit()
    assert summary == {"best_epoch": 2}
    assert recorder.events == [(1, True), (2, True), (3, False), (4, False), ("end", 2)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4] and lines[1]["best"] is True
    assert checkpoints.read_config(tmp_path / "best")["metrics"]["epoch"] == 2
    state = checkpoints.load_trainer_state(tmp_path / "last")
    assert (state["epoch"], state["best_val"], state["best_epoch"]) == (4, 4.0, 2)


def test_resume_continues_after_the_last_epoch(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=2, lr=0.1)
    Toy(cfg, [3.0, 2.0]).fit()
    cfg = TrainConfig(out=str(tmp_path), epochs=4, lr=0.1)
    toy = Toy(cfg, [3.0, 2.0, 2.5, 1.0], resume=True)
    assert toy.resuming
    summary = toy.fit()
    assert toy.trained == [3, 4] and summary["best_epoch"] == 4
    assert float(toy.model.weight.detach()) == 4.0
    log = (tmp_path / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(x)["epoch"] for x in log]
    assert epochs == [1, 2, 3, 4]


def test_a_fresh_run_starts_a_fresh_log(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=2, lr=0.1)
    Toy(cfg, [3.0, 2.0]).fit()
    Toy(cfg, [3.0, 2.0]).fit()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_train_config_checks_the_shared_options():
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="--lr-decay"):
        TrainConfig(lr_decay=1.5)
