"""``--config``: TOML files and replayed config.json for ``train music`` / ``train caption``."""

import argparse
import json
import tomllib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from bbservice.cli import main
from training import run_config, train_caption, train_music

REPO = Path(__file__).resolve().parents[1]


def music_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train music")
    train_music.add_arguments(parser)
    return parser


def caption_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train caption")
    train_caption.add_arguments(parser)
    return parser


def music_config(argv):
    return train_music.config_from_args(run_config.parse_args(music_parser(), argv))


@pytest.fixture
def tiny_music(tmp_path) -> Path:
    rng = np.random.default_rng(0)

    def song():
        root = int(rng.integers(48, 60))
        return [[root + k % 3 * 4, root + 12] for k in range(int(rng.integers(8, 16)))]

    data = {s: [song() for _ in range(n)] for s, n in (("train", 8), ("valid", 3), ("test", 3))}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_toml_values_become_the_options(tmp_path):
    toml = write(
        tmp_path / "run.toml",
        'gate = "lstm"\nbatch-size = 4\nlr = 1\nno_amp = true\nmin_lr = 1e-4\nhidden = 12\n'
        'init_output_bias = false\ndata = "$HOME/x.json"\n',
    )
    cfg = music_config(["--config", str(toml)])
    default = train_music.MusicTrainConfig()
    assert (cfg.model.gate.family, cfg.model.hidden_size, cfg.batch_size) == ("lstm", 12, 4)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.min_lr == 1e-4
    assert cfg.amp is False and cfg.init_output_bias is False
    assert cfg.data == str(Path.home() / "x.json")
    assert (cfg.epochs, cfg.clip, cfg.eval_batch_size) == (default.epochs, default.clip, 64)


def test_flags_on_the_command_line_win_wherever_they_stand(tmp_path):
    toml = write(tmp_path / "run.toml", 'lr = 0.5\nepochs = 7\ngate = "lstm"\n')
    for argv in (
        ["--lr", "0.002", "--config", str(toml)],
        ["--config", str(toml), "--lr", "0.002"],
    ):
        cfg = music_config(argv)
        assert cfg.lr == 0.002 and cfg.epochs == 7 and cfg.model.gate.family == "lstm"
    # a flag given with the default's value still beats the file
    assert music_config(["--epochs", "40", "--config", str(toml)]).epochs == 40


def test_extends_reads_the_base_first(tmp_path):
    write(tmp_path / "base.toml", "lr = 0.5\nepochs = 7\n")
    row = write(tmp_path / "row.toml", 'extends = "base.toml"\nepochs = 9\n')
    cfg = music_config(["--config", str(row)])
    assert (cfg.lr, cfg.epochs) == (0.5, 9)
    loop = write(tmp_path / "loop.toml", 'extends = "loop.toml"\n')
    with pytest.raises(SystemExit):
        music_config(["--config", str(loop)])


def test_unknown_key_names_it_and_the_valid_ones(tmp_path, capsys):
    toml = write(tmp_path / "run.toml", "lrr = 0.1\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "music", "--config", str(toml)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "unknown key 'lrr'" in err and "valid keys:" in err
    assert " lr," in err and "batch_size" in err and "min_lr" in err and "resume" not in err


@pytest.mark.parametrize(
    "text,message",
    [
        ('epochs = "ten"', "'epochs' in"),
        ("epochs = 2.5", "must be int"),
        ('gate = "nope"', "must be one of"),
        ("no_amp = 1", "true or false"),
        ('data = "$BBSERVICE_SURELY_UNSET_VAR/x"', "environment variable"),
        ("lr = [1", "not valid TOML"),
    ],
)
def test_bad_values_are_refused_with_the_key(tmp_path, text, message):
    toml = write(tmp_path / "run.toml", text + "\n")
    schema = run_config.SCHEMAS["music"]
    with pytest.raises(run_config.ConfigError, match=message):
        run_config.load(toml, music_parser(), schema)


def test_values_are_validated_by_the_training_config(tmp_path, capsys):
    toml = write(tmp_path / "run.toml", "epochs = 0\n")
    assert main(["train", "music", "--config", str(toml)]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_replay_of_a_real_run_gives_the_same_config(tiny_music, tmp_path):
    out = tmp_path / "run"
    argv = [
        "--data", str(tiny_music), "--out", str(out), "--gate", "bbeta3", "--hidden", "8",
        "--layers", "1", "--dropout", "0.1", "--epochs", "1", "--batch-size", "4",
        "--lr", "0.01", "--lr-decay", "0.7", "--patience", "1", "--clip", "2",
        "--weight-decay", "1e-4", "--early-stop", "2", "--seed", "3", "--transpose", "1",
        "--max-train-sequences", "6", "--kl-weight", "0.1", "--kl-alpha0", "0.7",
        "--gamma-sampler", "implicit", "--g2-tau", "0.5", "--no-amp", "--no-init-output-bias",
    ]  # fmt: skip
    original = music_config(argv)
    train_music.train(original)
    saved = out / "best" / "config.json"
    replayed = music_config(["--config", str(saved), "--out", str(out)])
    assert replayed == original
    # the replay never reuses the run folder; flags still win over the replayed file
    assert music_config(["--config", str(saved)]).out == train_music.MusicTrainConfig().out
    assert music_config(["--config", str(saved), "--seed", "9"]).seed == 9


def test_replay_refuses_what_no_option_can_say(tmp_path):
    cfg = train_music.MusicTrainConfig()
    config = {"kind": "music", "train": asdict(cfg)}
    config["train"]["model"]["gate"]["alpha_eps"] = 0.5
    path = write(tmp_path / "config.json", json.dumps(config))
    with pytest.raises(run_config.ConfigError, match="model.gate.alpha_eps"):
        run_config.load(path, music_parser(), run_config.SCHEMAS["music"])
    path.write_text(json.dumps({"kind": "caption", "train": {}}))
    with pytest.raises(run_config.ConfigError, match="not the config.json of a music run"):
        run_config.load(path, music_parser(), run_config.SCHEMAS["music"])


def test_caption_replay_round_trip(tmp_path):
    argv = [
        "--data", "d.json", "--gate", "lstm", "--hidden", "16", "--embed-dim", "8",
        "--grid", "3", "--fine-tune", "--no-cache", "--no-progress", "--no-amp", "--ss-max",
        "0.2", "--encoder-lr", "3e-4", "--val-beam", "2", "--max-val-images", "5",
    ]  # fmt: skip
    args = run_config.parse_args(caption_parser(), argv)
    original = train_caption.config_from_args(args)
    train = asdict(original)
    train["model"]["vocab_size"] = 77  # set by training: not an option, ignored on replay
    path = write(tmp_path / "config.json", json.dumps({"kind": "caption", "train": train}))
    replay = run_config.parse_args(caption_parser(), ["--config", str(path), "--out", original.out])
    assert train_caption.config_from_args(replay) == original  # --data came from the file


def test_checked_in_configs_parse_and_share_one_protocol():
    rows = sorted((REPO / "configs" / "music").glob("*_*.toml"))
    assert len(rows) == 13
    protocol_of = {}
    for row in rows:
        keys = tomllib.loads(row.read_text())
        assert set(keys) == {"extends", "data", "gate"}, row.name  # the protocol is shared
        dataset, family = row.stem.rsplit("_", 1)
        # one protocol for every family of a data set: JSB's, or the large sets'
        assert protocol_of.setdefault(dataset, keys["extends"]) == keys["extends"], row.name
        cfg = music_config(["--config", str(row)])
        assert cfg.model.gate.family == family and cfg.data == dataset
        assert cfg.early_stop > 0 and cfg.epochs >= 50
        assert cfg.length_buckets == (dataset != "jsb")
    assert protocol_of["jsb"] == "protocol.toml"
    for family in ("lstm", "bbeta5"):
        args = run_config.parse_args(
            caption_parser(),
            ["--config", str(REPO / "configs" / "caption" / f"scenes_{family}.toml")],
        )
        cfg = train_caption.config_from_args(args)
        assert cfg.model.gate.family == family and cfg.early_stop > 0 and not cfg.progress
    for row in sorted((REPO / "configs" / "caption").glob("*_*.toml")):  # every caption row
        args = run_config.parse_args(caption_parser(), ["--config", str(row)])
        cfg = train_caption.config_from_args(args)
        tier, family = row.stem.split("_")[:2]
        if tier == "scenes" and family == "encoder":  # the frozen rows' encoder
            assert cfg.model.fine_tune and cfg.model.gate.family == "lstm" and cfg.seed == 0
            continue
        assert cfg.model.gate.family == family, row.name
        assert cfg.model.fine_tune == (tier == "scenes"), row.name
        assert (cfg.model.encoder_weights is not None) == (tier == "frozen"), row.name
        assert bool(cfg.scst_after) == ("_scst" in row.stem), row.name
        assert cfg.scst_sample_gates == row.stem.endswith("_scst_gates"), row.name
