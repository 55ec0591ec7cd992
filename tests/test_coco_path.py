"""The whole COCO path on a tiny COCO-layout fixture the test writes itself: Karpathy JSON +
train2014/val2014 JPEGs -> ``train caption`` (cross-entropy from the feature cache, then an
SCST epoch) -> ``eval caption`` (diverse beam search) -> ``export caption`` -> the ONNX runtime
captions a photo of the test split (what the service runs per request)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bbservice import runtime
from bbservice.cli import main
from bbservice.decoding import beam_search
from bbservice.errors import ConfigError
from bbservice.images import load_image, preprocess
from training import run_config
from training.coco import write_coco_fixture
from training.train_caption import CaptionTrainConfig, add_arguments, config_from_args

FROZEN_TINY = [
    "--image-size", "32", "--grid", "2", "--encoder-stages", "2", "--hidden", "24",
    "--embed-dim", "16", "--attention-dim", "16", "--min-count", "1", "--batch-size", "8",
    "--max-length", "10", "--lr", "3e-3", "--no-progress", "--device", "cpu",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    sizes = {"train": 16, "restval": 4, "val": 4, "test": 4}
    return write_coco_fixture(tmp_path_factory.mktemp("coco"), sizes, image_size=32)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def entries(cache: Path) -> dict[str, float]:
    """Cache entry folder -> mtime of its array."""
    return {p.name: (p / "array.npy").stat().st_mtime_ns for p in sorted(cache.iterdir())}


def test_coco_json_to_a_served_caption(coco, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    train = ["train", "caption", "--data", str(coco), "--out", str(run), *FROZEN_TINY]
    scst = ["--scst-after", "1", "--scst-samples", "2", "--scst-baseline", "mean"]
    assert main([*train, "--epochs", "2", "--feature-cache", str(cache), *scst]) == 0
    recs = records(run)
    assert [(r["epoch"], r["phase"]) for r in recs] == [(1, "ce"), (2, "scst")]
    assert {"train_ce", "val_CIDEr-D", "val_BLEU-4", "val_ROUGE-L"} <= set(recs[0])
    scst_rec = recs[1]
    assert {"train_reward", "train_baseline", "train_advantage_std", "val_CIDEr-D"} <= set(scst_rec)
    assert "train_ce" not in scst_rec and scst_rec["train_reward"] >= 0.0
    # train (16 + 4 restval) and val images: a store and a feature array each
    cached = entries(cache)
    assert sorted(name.split("-")[0] for name in cached) == ["features"] * 2 + ["images"] * 2
    saved = json.loads((run / "last" / "config.json").read_text())["train"]
    assert saved["feature_cache"] == str(cache) and saved["scst_after"] == 1

    # A second run with the same frozen encoder reuses the cache (nothing rebuilt).
    again = tmp_path / "again"
    argv = [*train[:5], str(again), *FROZEN_TINY, "--epochs", "1", "--feature-cache", str(cache)]
    assert main(argv) == 0
    assert entries(cache) == cached

    report = tmp_path / "eval.json"
    ev = ["eval", "caption", "--checkpoint", str(run), "--data", str(coco), "--split", "test"]
    ev += ["--beam", "2", "--beam-groups", "2", "--diversity", "0.5", "--device", "cpu"]
    assert main([*ev, "--no-progress", "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["images"] == 4 and result["beam_groups"] == 2
    assert {"BLEU-4", "CIDEr-D", "ROUGE-L"} <= set(result["metrics"])

    export = tmp_path / "export"
    assert main(["export", "caption", str(run), "--out", str(export), "--no-store"]) == 0
    capsys.readouterr()
    loaded = runtime.load_export(export, device="cpu")
    photo = next((coco.parent / "val2014").glob("*.jpg"))
    image = preprocess(load_image(photo), loaded.image_size)[None]  # (1, 3, S, S)
    ids = loaded.special_ids
    best = beam_search(
        loaded.caption_stepper(),
        image,
        start_id=ids["start"],
        end_id=ids["end"],
        beam_size=2,
        max_length=loaded.max_length,
    )[0][0]
    words = loaded.words(best.tokens)
    assert words and all(w in loaded.vocabulary for w in words)
    assert np.isfinite(best.log_prob)


def test_feature_cache_needs_a_frozen_encoder(coco, tmp_path):
    with pytest.raises(ConfigError, match="frozen encoder"):
        CaptionTrainConfig(
            data=str(coco),
            feature_cache=str(tmp_path),
            model=CaptionTrainConfig().model.__class__(fine_tune=True),
        )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"scst_after": 3, "epochs": 3}, "leaves no SCST epoch"),
        ({"scst_after": 1, "scst_baseline": "best"}, "unknown SCST baseline"),
        ({"scst_after": 1, "scst_baseline": "mean", "scst_samples": 1}, "at least 2"),
        ({"scst_after": -1}, ">= 0"),
    ],
)
def test_scst_options_are_checked(kw, message):
    with pytest.raises(ConfigError, match=message):
        CaptionTrainConfig(**{"epochs": 5, **kw})


def test_scst_sample_gates_needs_stochastic_gates():
    from bbservice.gates import GateConfig
    from bbservice.models.caption import CaptionConfig

    lstm = CaptionConfig(gate=GateConfig(family="lstm"))
    with pytest.raises(ConfigError, match="stochastic gate family"):
        CaptionTrainConfig(epochs=3, scst_after=1, scst_sample_gates=True, model=lstm)


def test_new_options_come_from_a_toml_config(coco, tmp_path):
    import argparse

    toml = tmp_path / "run.toml"
    toml.write_text(
        f'data = "{coco}"\nencoder-weights = "imagenet"\nfeature-cache = "{tmp_path}/c"\n'
        'scst-after = 4\nscst-baseline = "mean"\nscst-samples = 3\nscst-sample-gates = true\n'
        "scst-lr = 5e-5\nepochs = 6\n"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(run_config.parse_args(parser, ["--config", str(toml)]))
    assert cfg.model.encoder_weights == "imagenet" and cfg.feature_cache == f"{tmp_path}/c"
    assert (cfg.scst_after, cfg.scst_baseline, cfg.scst_samples) == (4, "mean", 3)
    assert cfg.scst_sample_gates and cfg.scst_lr == 5e-5
    assert [cfg.is_scst_epoch(e) for e in range(1, 7)] == [False] * 4 + [True] * 2
