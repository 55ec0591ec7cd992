"""Music training, evaluation and generation end to end on small data (CLI included)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_training_at, same_weights, without_times

from bbservice.cli import main
from training.eval_music import evaluate
from training.music_data import load_music
from training.train_music import MusicTrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_music(tmp_path) -> Path:
    """A pitch-list JSON with a learnable pattern: arpeggios over a few chords."""
    rng = np.random.default_rng(0)

    def song():
        root = int(rng.integers(48, 60))
        return [[root + k % 3 * 4, root + 12] for k in range(int(rng.integers(12, 30)))]

    data = {
        split: [song() for _ in range(n)] for split, n in (("train", 24), ("valid", 6), ("test", 6))
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    return path


def small_config(data: Path, out: Path, **kw) -> MusicTrainConfig:
    kw = {"epochs": 3, "batch_size": 8, "lr": 1e-2, "seed": 1, **kw}
    cfg = MusicTrainConfig(data=str(data), out=str(out), **kw)
    cfg.model.hidden_size, cfg.model.gate = 24, cfg.model.gate
    return cfg


def test_training_learns_checkpoints_and_logs(tiny_music, tmp_path):
    out = tmp_path / "run"
    summary = train(small_config(tiny_music, out, batch_size=4))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["valid_nll"] < records[0]["valid_nll"]
    # The frequency baseline: every key on with its train-set frequency (an untrained model
    # with the output bias at the key log-odds scores exactly this).
    splits = load_music(tiny_music)
    p = np.concatenate(splits.train).astype(np.float64).mean(0).clip(1e-6, 1 - 1e-6)
    targets = np.concatenate([s[1:] for s in splits.test]).astype(np.float64)
    baseline = -float((targets @ np.log(p) + (1 - targets) @ np.log1p(-p)).sum()) / len(targets)
    assert evaluate(out, split="test")["trivial_baseline_nll"] == pytest.approx(baseline)
    print(f"test NLL {summary['test_nll']:.3f}, frequency baseline {baseline:.3f}")
    assert summary["test_nll"] < baseline - 0.75  # learnt the arpeggios (5.14 vs 6.35 nats)
    assert (out / "best" / "model.safetensors").exists() and (out / "curves.png").exists()
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["kind"] == "music" and config["metrics"]["test_nll"] == summary["test_nll"]
    assert all(r["skipped_steps"] == 0 and r["cell_grad_norm"] > 0 for r in records)


def read_records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("length_buckets", [False, True])
def test_resume_continues_after_the_last_finished_epoch(
    tiny_music, tmp_path, one_thread, length_buckets
):
    out = tmp_path / "run"
    cfg = small_config(tiny_music, out, early_stop=3, length_buckets=length_buckets)
    cfg.model.dropout, cfg.epochs = 0.2, 2
    train(cfg)
    cfg.epochs = 4
    train(cfg, resume=True)
    records = read_records(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    straight = tmp_path / "straight"
    cfg2 = small_config(tiny_music, straight, early_stop=3, length_buckets=length_buckets)
    cfg2.model.dropout, cfg2.epochs = 0.2, 4
    train(cfg2)
    assert without_times(read_records(straight)) == without_times(records)  # the resumed epochs too
    assert same_weights(out / "last", straight / "last") == []


@pytest.mark.parametrize("pause", ["epoch2:step1", "epoch2:swap"])
def test_a_killed_run_resumes_to_the_weights_of_an_unbroken_run(
    tiny_music, tmp_path, pause, one_thread
):
    """SIGKILL a real training process inside epoch 2 (or between the renames of last/ after
    it), resume it and compare with an uninterrupted run, bit for bit."""
    argv = ["train", "music", "--data", str(tiny_music), "--epochs", "3", "--hidden", "16"]
    argv += ["--batch-size", "8", "--lr", "1e-2", "--seed", "4", "--device", "cpu"]
    argv += ["--gate", "bbeta5", "--kl-weight", "0.01", "--dropout", "0.2", "--early-stop", "5"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    log = kill_training_at([*argv, "--out", str(run)], pause, tmp_path)
    assert "epoch 1 " in log and "epoch 2 " not in log
    if pause.endswith("swap"):  # cut between the renames: no last/, only the swap's copies
        assert not (run / "last").exists() and (run / ".last.old").is_dir()
    assert main([*argv, "--out", str(run), "--resume"]) == 0
    assert main([*argv, "--out", str(straight)]) == 0
    assert without_times(read_records(run)) == without_times(read_records(straight))
    assert [r["epoch"] for r in read_records(run)] == [1, 2, 3]
    for folder in ("last", "best"):
        assert same_weights(run / folder, straight / folder) == []
    resumed = torch.load(run / "last" / "trainer.pt", weights_only=False)
    unbroken = torch.load(straight / "last" / "trainer.pt", weights_only=False)
    assert resumed["scheduler"] == unbroken["scheduler"]
    assert resumed["data_rng"] == unbroken["data_rng"]
    assert all(
        torch.equal(resumed["optimizer"]["state"][k]["exp_avg"], v["exp_avg"])
        for k, v in unbroken["optimizer"]["state"].items()
    )


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_music, tmp_path, monkeypatch, capsys):
    """The music trainer's steps go through the shared NaN policy: every third batch's loss
    made NaN is skipped and counted; NaN everywhere stops the run with a one-line error
    and no checkpoint."""
    import training.train_music as train_music

    real, calls = train_music.frame_nll_sum, []

    def poisoned(logits, targets, mask, every):
        calls.append(1)
        nll = real(logits, targets, mask)
        return nll * float("nan") if len(calls) % every == 0 else nll

    monkeypatch.setattr(train_music, "frame_nll_sum", lambda *a: poisoned(*a, every=3))
    out = tmp_path / "some"
    train(small_config(tiny_music, out, epochs=2))  # 3 batches per epoch: one NaN each
    records = read_records(out)
    assert [r["skipped_steps"] for r in records] == [1, 1]
    assert all(np.isfinite(r["train_nll"]) and np.isfinite(r["valid_nll"]) for r in records)

    monkeypatch.setattr(train_music, "frame_nll_sum", lambda *a: poisoned(*a, every=1))
    argv = ["train", "music", "--data", str(tiny_music), "--out", str(tmp_path / "all")]
    assert main([*argv, "--hidden", "8", "--max-bad-steps", "2", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 steps in a row with a non-finite loss or gradient" in err
    assert not (tmp_path / "all" / "last").exists()


def test_resume_without_a_checkpoint_is_an_error(tiny_music, tmp_path, capsys):
    argv = ["train", "music", "--data", str(tiny_music), "--out", str(tmp_path / "none")]
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no checkpoint to resume" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "none" / "metrics.jsonl").exists()


def test_eval_monte_carlo_and_generate_cli(tiny_music, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = small_config(tiny_music, out)
    cfg.model.gate = type(cfg.model.gate)(family="bbeta5", kl_weight=0.01)
    train(cfg)
    assert main(["eval", "music", "--checkpoint", str(out), "--samples", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicted_frames"] == sum(len(s) - 1 for s in load_music(tiny_music).test)
    assert np.isfinite(result["nll_monte_carlo"]) and np.isfinite(result["nll_mean_gates"])
    gen = tmp_path / "gen"
    args = [
        "generate",
        "music",
        "--checkpoint",
        str(out),
        "--out",
        str(gen),
        "--frames",
        "16",
        "--num-outputs",
        "2",
        "--seed",
        "5",
    ]
    assert main(args) == 0
    first = (gen / "music_5_0.mid").read_bytes()
    assert (gen / "music_5_1.png").exists()
    assert main(args) == 0 and (gen / "music_5_0.mid").read_bytes() == first
    primer = gen / "music_5_1.mid"
    assert main([*args, "--primer", str(primer), "--mode", "sample"]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "music", "--data", "/nope/x.mat"], "neither an existing path"),
        (["train", "music", "--data", "{bad}", "--epochs", "0"], "--epochs must be >= 1"),
        (["eval", "music", "--checkpoint", "/nope"], "does not exist"),
        (["train", "music", "--gate", "lstm", "--kl-weight", "1"], "needs a Beta gate family"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(argv, message, capsys, tmp_path):
    argv = [a.replace("{bad}", str(tmp_path / "bad.json")) for a in argv]
    (tmp_path / "bad.json").write_text("{}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_corrupt_midi_primer_is_reported(tiny_music, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = small_config(tiny_music, out)
    cfg.epochs = 1
    train(cfg)
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd garbage")
    assert main(["generate", "music", "--checkpoint", str(out), "--primer", str(bad)]) == 2
    assert "bad.mid" in capsys.readouterr().err


def test_torchrun_ddp_with_two_cpu_processes(tiny_music, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "bbservice.cli",
        "train",
        "music",
        "--data",
        str(tiny_music),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--hidden",
        "16",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and (out / "best" / "model.safetensors").exists()
