"""The training-loop skeleton (training.loop): best epoch, early stop, checkpoints, resume,
callbacks — with a toy trainer whose scores are scripted."""

from __future__ import annotations

import json

import pytest
import torch

from bbservice import checkpoints
from bbservice.errors import ConfigError
from training import common
from training.loop import Best, Callback, TrainingDiverged, TrainingLoop, Validation
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


def test_resume_without_a_checkpoint_is_an_error_unless_if_present(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=2, lr=0.1)
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        Toy(cfg, [3.0, 2.0], resume=True)
    toy = Toy(cfg, [3.0, 2.0], resume="if-present")
    assert not toy.resuming and toy.fit()["best_epoch"] == 2
    again = Toy(TrainConfig(out=str(tmp_path), epochs=3, lr=0.1), [3.0, 2.0, 1.0], "if-present")
    assert again.resuming and again.fit()["best_epoch"] == 3 and again.trained == [3]


def test_resume_keeps_the_early_stop_count_and_the_better_best(tmp_path):
    scores = [5.0, 4.0, 4.5, 4.2, 1.0]
    cfg = TrainConfig(out=str(tmp_path), epochs=3, early_stop=2, lr=0.1)
    Toy(cfg, scores).fit()
    cfg = TrainConfig(out=str(tmp_path), epochs=10, early_stop=2, lr=0.1)
    toy = Toy(cfg, scores, resume=True)
    assert toy.fit() == {"best_epoch": 2}
    assert toy.trained == [4]  # one more epoch without gain: stopped as an unbroken run does
    assert checkpoints.read_config(tmp_path / "best")["metrics"]["epoch"] == 2  # not 3 or 4
    again = Toy(cfg, scores, resume=True)  # resumed after the stopping epoch: nothing to do
    assert again.fit() == {"best_epoch": 2} and again.trained == []
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


class Steps(Toy):
    """A one-weight model trained by ``step``: the losses of each epoch's batches are
    ``factor * w``, ``factor`` from a script (``nan`` / ``inf`` make a bad step)."""

    def __init__(self, cfg, factors, **kw):
        super().__init__(cfg, [1.0] * cfg.epochs, **kw)
        self.factors = factors
        self.weights = []

    def train_epoch(self, epoch):
        self.trained.append(epoch)
        for factor in self.factors[epoch - 1]:
            loss = factor * self.model.weight.sum()
            taken = self.step(loss)
            self.weights.append((taken, float(self.model.weight.detach())))
        return {}

    def grad_cell(self):
        return self.model


def test_non_finite_steps_are_skipped_and_counted(tmp_path, caplog):
    cfg = TrainConfig(out=str(tmp_path), epochs=2, lr=0.1, clip=100.0)
    nan, inf = float("nan"), float("inf")
    toy = Steps(cfg, [[1.0, nan, 1.0], [inf, 1.0, 1.0]])
    start = float(toy.model.weight.detach())
    toy.fit()
    assert [taken for taken, _ in toy.weights] == [True, False, True, False, True, True]
    weights = [w for _, w in toy.weights]
    assert weights[0] == pytest.approx(start - 0.1) and weights[1] == weights[0]  # skipped
    assert weights[2] == pytest.approx(start - 0.2) and weights[3] == weights[2]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines] == [1, 1]
    assert all(r["cell_grad_norm"] == pytest.approx(1.0) for r in lines)  # finite steps only
    assert "step skipped" in caplog.text


def test_too_many_bad_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=3, lr=0.1, max_bad_steps=3)
    nan = float("nan")
    toy = Steps(cfg, [[1.0], [nan, nan, 1.0, nan, nan], [nan] * 3])  # 2 in a row: fine
    with pytest.raises(TrainingDiverged, match="3 steps in a row with a non-finite"):
        toy.fit()
    assert toy.trained == [1, 2, 3]
    state = checkpoints.load_trainer_state(tmp_path / "last")
    assert state["epoch"] == 2  # last/ holds the last good epoch
    with pytest.raises(ValueError, match="--max-bad-steps must be >= 1"):
        TrainConfig(max_bad_steps=0)


def test_no_checkpoint_from_non_finite_weights(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=3, lr=0.1)
    toy = Toy(cfg, [3.0, 2.0, 1.0])
    toy.train_epoch = lambda epoch: (
        toy.model.weight.data.fill_(float("nan") if epoch == 2 else epoch),
        {},
    )[1]
    with pytest.raises(TrainingDiverged, match="weights are not finite; no checkpoint"):
        toy.fit()
    assert checkpoints.load_trainer_state(tmp_path / "last")["epoch"] == 1
    assert checkpoints.read_config(tmp_path / "best")["metrics"]["epoch"] == 1


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr("sys.stderr", Tty(True))
    assert common.progress_enabled() and not common.progress_enabled(False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not common.progress_enabled()
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr("sys.stderr", Tty(False))
    assert not common.progress_enabled()
    toy = Toy(TrainConfig(out="unused"), [1.0])
    assert toy.progress_bar(range(3), "epoch 1").disable


def test_grad_scaler_only_with_float16_autocast():
    cpu = torch.device("cpu")
    assert common.amp_dtype(cpu) is None and not common.grad_scaler(cpu).is_enabled()
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        fp16 = common.amp_dtype(cuda) == torch.float16
        assert common.grad_scaler(cuda).is_enabled() == fp16
        assert not common.grad_scaler(cuda, enabled=False).is_enabled()


def test_the_tracker_writes_tensorboard_scalars_and_hparams(tmp_path):
    pytest.importorskip("tensorboard", reason="the track extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(out=str(tmp_path), epochs=2, lr=0.1)
    Steps(cfg, [[1.0, float("nan")], [1.0]]).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"skipped_steps", "cell_grad_norm", "valid"} <= tags
    assert [e.value for e in events.Scalars("skipped_steps")] == [1.0, 0.0]


def test_loss_scaling_skips_overflows_and_steps_with_unscaled_gradients(tmp_path):
    """The float16 path's GradScaler (run here on the CPU): a scale that overflows the
    gradients skips the step and halves; once finite, the step uses the unscaled gradient."""
    cfg = TrainConfig(out=str(tmp_path), epochs=1, lr=0.01, clip=100.0)
    toy = Steps(cfg, [[8.0] * 5])
    toy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # 8 · 2^127 = inf in fp32
    start = float(toy.model.weight.detach())
    toy.fit()
    assert [taken for taken, _ in toy.weights] == [False, False, False, True, True]
    assert toy.weights[-1][1] == pytest.approx(start - 2 * 0.01 * 8.0)
    assert toy.scaler.get_scale() == 2.0**124
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["skipped_steps"] == 3
    state = checkpoints.load_trainer_state(tmp_path / "last")
    assert state["scaler"]["scale"] == 2.0**124  # resumed with the scale it had
