"""Caption training, evaluation and captioning end to end on a few generated scenes (CLI too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import kill_training_at, same_weights, without_times

from bbservice import checkpoints
from bbservice.cli import main
from bbservice.gates import GateConfig
from bbservice.models.caption import CaptionConfig
from bbservice.vocab import Vocabulary
from training.scenes import generate_scenes
from training.train_caption import CaptionTrainConfig, train

REPO = Path(__file__).resolve().parents[1]
MODEL_ARGS = [
    "--image-size", "32", "--grid", "2", "--encoder-stages", "2", "--hidden", "24",
    "--embed-dim", "16", "--attention-dim", "16", "--min-count", "1", "--batch-size", "8",
    "--max-length", "12", "--fine-tune", "--lr", "3e-3", "--no-progress",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    return generate_scenes(
        out, n_train=40, n_val=8, n_test=8, seed=0, image_size=32, holdout=[("red", "triangle")]
    )


def small_config(data: Path, out: Path, **kw) -> CaptionTrainConfig:
    model = CaptionConfig(
        image_size=32,
        grid_size=2,
        encoder_stages=2,
        fine_tune=True,
        embed_dim=16,
        attention_dim=16,
        hidden_size=24,
        dropout=0.1,
        gate=GateConfig(family="bbeta5", kl_weight=1e-3),
        max_length=12,
    )
    base = dict(
        data=str(data), out=str(out), epochs=2, batch_size=8, lr=3e-3, min_count=1, seed=3,
        progress=False, model=model,
    )  # fmt: skip
    return CaptionTrainConfig(**{**base, **kw})


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(small_config(scenes, run, ss_max=0.5, ss_ramp=1))
    return run


def test_training_writes_best_last_logs_and_curves(trained):
    for folder in ("best", "last"):
        for name in ("model.safetensors", "config.json", "vocab.json"):
            assert (trained / folder / name).is_file()
    assert (trained / "last" / "trainer.pt").is_file()
    assert (trained / "curves.png").stat().st_size > 0
    recs = records(trained)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert {"train_ce", "val_ce", "val_BLEU-4", "val_CIDEr-D", "train_kl_per_token"} <= set(recs[0])
    assert recs[1]["train_ce"] < recs[0]["train_ce"]
    assert recs[1]["ss_prob"] == 0.5 and recs[0]["ss_prob"] == 0.5
    config = json.loads((trained / "best" / "config.json").read_text())
    assert config["kind"] == "caption" and config["train"]["epochs"] == 2
    vocab = Vocabulary.from_json(trained / "best" / "vocab.json")
    model = checkpoints.load_caption_model(trained)[0]
    assert model.config.vocab_size == len(vocab) and model.config.gate.family == "bbeta5"


def test_a_frozen_decoder_run_on_a_trained_runs_encoder(trained, scenes, tmp_path):
    """--encoder-weights RUN: the fine-tuned run's encoder, frozen, through the feature cache."""
    donor = checkpoints.load_caption_model(trained)[0].encoder.state_dict()
    model_cfg = replace(small_config(scenes, tmp_path).model, fine_tune=False)
    model_cfg.encoder_weights = str(trained)
    run = tmp_path / "frozen"
    cfg = small_config(scenes, run, epochs=1, model=model_cfg, feature_cache=str(tmp_path / "c"))
    train(cfg)
    encoder = checkpoints.load_caption_model(run)[0].encoder.state_dict()
    for key, value in donor.items():  # frozen: batch-norm statistics included
        torch.testing.assert_close(encoder[key], value, msg=key)
    assert records(run)[0]["val_CIDEr-D"] >= 0


def test_resume_continues_after_the_last_finished_epoch(scenes, tmp_path):
    straight = tmp_path / "straight"
    train(small_config(scenes, straight, epochs=2))
    run = tmp_path / "run"
    train(small_config(scenes, run, epochs=1))
    # A crash after epoch 2 was logged but before last/ was written: epoch 2 is redone.
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"epoch": 2, "val_ce": -1.0}) + "\n")
    train(small_config(scenes, run, epochs=2), resume=True)
    got, want = records(run), records(straight)
    assert [r["epoch"] for r in got] == [1, 2]
    for a, b in zip(got, want, strict=True):  # the same as an uninterrupted run
        assert a["val_ce"] == pytest.approx(b["val_ce"], rel=1e-5)
        assert a["train_ce"] == pytest.approx(b["train_ce"], rel=1e-5)
    assert train(small_config(scenes, run, epochs=2), resume=True)["best_epoch"] >= 1  # no-op


def test_a_killed_run_resumes_to_the_weights_of_an_unbroken_run(scenes, tmp_path):
    """SIGKILL a real training process inside epoch 2, resume it and compare with an
    uninterrupted run bit for bit (stochastic gates, dropout and scheduled sampling draw from
    every random stream)."""
    argv = ["train", "caption", "--data", str(scenes), "--epochs", "2", "--device", "cpu"]
    argv += [*MODEL_ARGS, "--gate", "bbeta5", "--kl-weight", "1e-3", "--dropout", "0.2"]
    argv += ["--ss-max", "0.5", "--ss-ramp", "1", "--seed", "5", "--max-train-images", "24"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    log = kill_training_at([*argv, "--out", str(run)], "epoch2:step1", tmp_path)
    assert "epoch 1 " in log and "epoch 2 " not in log
    assert [r["epoch"] for r in records(run)] == [1]
    assert main([*argv, "--out", str(run), "--resume"]) == 0
    assert main([*argv, "--out", str(straight)]) == 0
    assert without_times(records(run)) == without_times(records(straight))
    assert [r["epoch"] for r in records(run)] == [1, 2]
    assert same_weights(run / "last", straight / "last") == []
    assert same_weights(run / "best", straight / "best") == []


def test_scst_steps_take_the_shared_nan_policy_and_measure_the_cell(scenes, tmp_path, monkeypatch):
    """An SCST epoch steps through the loop's step(): a NaN loss is skipped and counted, the
    other steps update the model and log the cell's gradient norm."""
    import training.train_caption as train_caption

    real, calls = train_caption.scst_step, []

    def poisoned(*args, **kw):
        result = real(*args, **kw)
        calls.append(1)
        return result._replace(loss=result.loss * float("nan")) if len(calls) == 1 else result

    monkeypatch.setattr(train_caption, "scst_step", poisoned)
    run = tmp_path / "scst"
    cfg = small_config(scenes, run, epochs=2, scst_after=1, scst_samples=2)
    train(cfg)  # 40 images, batches of 8: 5 SCST steps, the first one NaN
    recs = records(run)
    assert [(r["phase"], r["skipped_steps"]) for r in recs] == [("ce", 0), ("scst", 1)]
    assert len(calls) == 5 and recs[1]["cell_grad_norm"] > 0


def test_torchrun_ddp_with_two_cpu_processes(scenes, tmp_path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "bbservice.cli", "train", "caption", "--data", str(scenes), "--out", str(run),
        "--epochs", "2", "--gate", "lstm", "--device", "cpu", *MODEL_ARGS,
        "--scst-after", "1", "--scst-samples", "2",  # epoch 2: SCST, gradients averaged by hand
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # A session of its own: on a timeout the launcher *and* its workers are killed.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    assert "2 process(es)" in stderr
    recs = records(run)  # validation split across both processes, scored on rank 0
    assert [(r["epoch"], r["phase"]) for r in recs] == [(1, "ce"), (2, "scst")]
    assert recs[1]["train_reward"] >= 0.0 and "val_CIDEr-D" in recs[1]
    assert (run / "best" / "model.safetensors").is_file()
    assert (run / "last" / "trainer.pt").is_file()


def test_eval_cli_prints_and_writes_metrics_with_baseline(trained, scenes, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", "caption", "--checkpoint", str(trained), "--data", str(scenes)]
    args += ["--beam", "4", "--beam-groups", "2", "--diversity", "0.5"]  # diverse beam search
    assert main([*args, "--split", "test_holdout", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CIDEr-D" in printed and "baseline caption" in printed
    report = json.loads(out.read_text())
    assert report["split"] == "test_holdout" and report["images"] == 8
    assert (report["beam"], report["beam_groups"], report["diversity"]) == (4, 2, 0.5)
    assert set(report["metrics"]) >= {"BLEU-4", "CIDEr-D", "ROUGE-L"}
    assert set(report["baseline"]["metrics"]) >= {"BLEU-4", "CIDEr-D"}


def test_caption_cli_n_best_gate_samples_and_attention(trained, scenes, tmp_path, capsys):
    images = sorted((scenes.parent / "images").glob("test_*.png"))[:2]
    out = tmp_path / "att.png"
    argv = ["caption", *map(str, images), "--checkpoint", str(trained), "--beam", "3"]
    argv += ["--n-best", "2", "--sample-gates", "3", "--seed", "1", "--attention", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("  1. ") == 2 and printed.count("  2. ") == 2
    assert printed.count("sampled-gate passes") == 2
    for image in images:
        assert (tmp_path / f"att_{image.stem}.png").stat().st_size > 0


def test_caption_cli_diverse_beam_search(trained, scenes, capsys):
    image = str(sorted((scenes.parent / "images").glob("test_*.png"))[0])
    argv = ["caption", image, "--checkpoint", str(trained), "--beam", "4", "--n-best", "2"]
    assert main([*argv, "--beam-groups", "2", "--diversity", "100"]) == 0
    printed = capsys.readouterr().out.splitlines()
    first, second = (line.split("(log p")[0].split(". ", 1)[1] for line in printed[1:3])
    assert first != second  # a strong diversity: the two groups' captions differ
    assert main([*argv, "--beam-groups", "2", "--diversity", "-1"]) == 2
    assert "--diversity must be a finite number >= 0" in capsys.readouterr().err


def test_caption_cli_reports_bad_files_and_captions_the_rest(trained, scenes, tmp_path, capsys):
    good = sorted((scenes.parent / "images").glob("val_*.png"))[0]
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    missing = tmp_path / "missing.jpg"
    rc = main(["caption", str(missing), str(good), str(text), "--checkpoint", str(trained)])
    captured = capsys.readouterr()
    assert rc == 2
    assert f"{good}: " in captured.out
    errors = captured.err.strip().splitlines()
    assert any(str(missing) in line and "not found" in line for line in errors)
    assert any(str(text) in line and "not an image" in line for line in errors)
    assert len(errors) == 3  # one line per bad file and a count


def test_caption_cli_on_the_shared_photos(trained, shared_data, capsys):
    photos = sorted(p for p in (shared_data / "images").iterdir() if p.is_file())
    assert main(["caption", *map(str, photos), "--checkpoint", str(trained), "--beam", "2"]) == 0
    assert capsys.readouterr().out.count(": ") >= len(photos)


@pytest.mark.parametrize(
    "problem,message",
    [
        ("corrupt", "not valid JSON"),
        ("no-val", "split 'val' is empty or absent"),
        ("missing", "file not found"),
        ("no-words", "no word occurs"),
    ],
)
def test_train_cli_data_errors_are_one_line(problem, message, scenes, tmp_path, capsys):
    data = tmp_path / "data.json"
    original = json.loads(scenes.read_text())
    if problem == "corrupt":
        data.write_text(scenes.read_text()[:500])
    elif problem == "no-val":
        original["images"] = [im for im in original["images"] if im["split"] != "val"]
        data.write_text(json.dumps(original))
    elif problem == "no-words":
        data = scenes
    else:
        data = tmp_path / "absent.json"
    extra = ["--min-count", "100000"] if problem == "no-words" else []
    argv = ["train", "caption", "--data", str(data), "--out", str(tmp_path / "run"), *MODEL_ARGS]
    argv += ["--image-root", str(scenes.parent)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_eval_cli_errors(trained, scenes, tmp_path, capsys):
    assert (
        main(["eval", "caption", "--checkpoint", str(tmp_path / "none"), "--data", str(scenes)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    argv = ["eval", "caption", "--checkpoint", str(trained), "--data", str(scenes)]
    assert main([*argv, "--split", "nonesuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split 'nonesuch' is empty or absent" in err[0]
    assert main([*argv, "--beam", "3", "--beam-groups", "2"]) == 2
    assert "--beam-groups (2) must be >= 1 and divide --beam (3)" in capsys.readouterr().err


def test_generate_scenes_cli(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["generate", "scenes", "--out", str(out), "--n-train", "3", "--n-val", "1"]
    argv += ["--n-test", "1", "--image-size", "32", "--holdout", "red:triangle,blue:circle"]
    assert main(argv) == 0
    assert "test_holdout 1" in capsys.readouterr().out
    meta = json.loads((out / "dataset_scenes.json").read_text())["meta"]
    assert meta["holdout"] == [["blue", "circle"], ["red", "triangle"]]
    assert main([*argv[:-1], "red-triangle"]) == 2
    assert "COLOUR:SHAPE" in capsys.readouterr().err
    assert main([*argv[:-1], "pink:triangle"]) == 2
    assert "not a (colour, shape) pair" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="ss-max"):
        CaptionTrainConfig(ss_max=2.0)
    cfg = CaptionTrainConfig(ss_max=0.3, ss_start=2, ss_ramp=3)
    assert [cfg.sampling_probability(e) for e in (1, 2, 3, 4, 5)] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3, 0.3]
    )
    again = CaptionTrainConfig(**{**cfg.__dict__, "model": cfg.model.to_dict()})
    assert again.model == cfg.model == replace(cfg.model)


def test_sparsify_trains_reports_evaluates_and_exports_a_pruned_model(scenes, tmp_path, capsys):
    run, export = tmp_path / "sparse", tmp_path / "export"
    argv = ["train", "caption", "--data", str(scenes), "--out", str(run), "--epochs", "2"]
    argv += [*MODEL_ARGS, "--gate", "bbeta5", "--sparsify", "--sparse-kl-weight", "1"]
    argv += ["--sparse-kl-warmup", "2"]
    assert main(argv) == 0
    assert "pruning report (bbeta5" in capsys.readouterr().out
    recs = records(run)
    assert 0 < recs[0]["sparse_kl_weight"] < recs[1]["sparse_kl_weight"] <= 1
    assert all(r["sparse_kl"] > 0 and set(r["sparsity"]) >= {"preact", "input"} for r in recs)
    report = json.loads((run / "best" / "prune_report.json").read_text())
    assert report["kind"] == "caption" and report["totals"]["dense_parameters"] > 0
    assert json.loads((run / "summary.json").read_text())["prune"] == report["totals"]
    assert main(["eval", "caption", "--checkpoint", str(run), "--data", str(scenes)]) == 0
    assert "pruning report" in capsys.readouterr().out
    assert main(["export", "caption", str(run), "--out", str(export), "--no-store"]) == 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and "pruned" in manifest["config"]
    assert manifest["config"]["pruned"]["max_abs_diff_vs_sparse"]["log_probs"] < 1e-4
