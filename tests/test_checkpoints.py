"""The checkpoint format (bbservice.checkpoints): save, load, resolve a run folder, both kinds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_caption_config

from bbservice import checkpoints
from bbservice.errors import ConfigError, DataError
from bbservice.gates import GateConfig
from bbservice.models.caption import CaptionModel
from bbservice.models.music import MusicConfig, PianoRollModel
from bbservice.vocab import Vocabulary, placeholder_words


def _music() -> PianoRollModel:
    torch.manual_seed(0)
    return PianoRollModel(MusicConfig(gate=GateConfig(family="bbeta5"), hidden_size=8)).eval()


def test_music_round_trip_through_a_run_folder(tmp_path):
    model = _music()
    config = {"kind": "music", "model": model.config.to_dict(), "metrics": {"epoch": 3}}
    checkpoints.save_checkpoint(tmp_path / "run" / "best", model, config, {"epoch": 3})
    assert checkpoints.resolve(tmp_path / "run") == tmp_path / "run" / "best"
    assert (tmp_path / "run" / "best" / checkpoints.TRAINER_FILE).is_file()
    loaded, saved = checkpoints.load_music(tmp_path / "run")
    assert saved == config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert checkpoints.load_trainer_state(tmp_path / "run" / "best") == {"epoch": 3}
    again, _ = checkpoints.load_model(tmp_path / "run")  # the kind read from config.json
    assert isinstance(again, PianoRollModel)


def test_caption_checkpoint_with_its_vocabulary(tmp_path):
    model = CaptionModel.build(tiny_caption_config("lstm", sparse=False)).eval()
    vocab = Vocabulary(placeholder_words(model.config.vocab_size)[4:])
    config = {"kind": "caption", "model": model.config.to_dict()}
    files = {"vocab.json": json.dumps({"itos": vocab.itos})}
    checkpoints.save_checkpoint(tmp_path / "best", model, config, None, files)
    loaded, got_vocab, folder = checkpoints.load_caption(tmp_path)
    assert folder == tmp_path / "best" and got_vocab == vocab
    assert loaded.config == model.config
    (tmp_path / "best" / "vocab.json").write_text(json.dumps({"itos": vocab.itos[:5]}))
    with pytest.raises(ConfigError, match="vocab.json has 5 words"):
        checkpoints.load_caption(tmp_path)


def test_old_checkpoints_without_kind_still_load(tmp_path):
    model = _music()
    checkpoints.save_checkpoint(tmp_path, model, {"model": model.config.to_dict()})
    loaded, _ = checkpoints.load_music(tmp_path)
    assert isinstance(loaded, PianoRollModel)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        checkpoints.load_music(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a checkpoint folder"):
        checkpoints.load_music(tmp_path / "empty")
    model = _music()
    checkpoints.save_checkpoint(tmp_path / "m", model, {"kind": "music", "model": {}})
    with pytest.raises(DataError, match="not caption"):
        checkpoints.load_caption_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        checkpoints.read_config(tmp_path / "m")
    other = PianoRollModel(MusicConfig(gate=GateConfig(family="lstm"), hidden_size=4))
    checkpoints.save_checkpoint(tmp_path / "w", other, {"kind": "music", "model": {}})
    (tmp_path / "w" / "config.json").write_text(
        json.dumps({"kind": "music", "model": model.config.to_dict()})
    )
    with pytest.raises(DataError, match="weights do not load"):
        checkpoints.load_music(tmp_path / "w")


def test_find_looks_in_candidates_and_their_best(tmp_path):
    model = _music()
    checkpoints.save_checkpoint(tmp_path / "run" / "best", model, {"kind": "music"})
    found = checkpoints.find([tmp_path / "nothing", tmp_path / "run"])
    assert found == tmp_path / "run" / "best"
    assert checkpoints.find([tmp_path / "nothing"]) is None


def test_atomic_dir_leaves_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with checkpoints.atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), checkpoints.atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _swap_cut(tmp_path, keep_new: bool):
    """A run folder as a kill between the two renames of a last/ swap leaves it."""
    model = _music()
    last = tmp_path / "last"
    config = {"kind": "music", "model": model.config.to_dict()}
    checkpoints.save_checkpoint(last, model, {**config, "metrics": {"epoch": 1}}, {"e": 1})

    def die():
        raise KeyboardInterrupt("killed between the renames")

    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(
            last, model, {**config, "metrics": {"epoch": 2}}, {"e": 2}, between_renames=die
        )
    assert not last.exists() and (tmp_path / ".last.old").is_dir()
    assert (tmp_path / ".last.tmp").is_dir()
    if not keep_new:
        import shutil

        shutil.rmtree(tmp_path / ".last.tmp")
    return last


@pytest.mark.parametrize("keep_new", [True, False])
def test_a_swap_cut_between_the_renames_is_recovered(tmp_path, keep_new):
    last = _swap_cut(tmp_path, keep_new)
    assert checkpoints.load_trainer_state(last) == {"e": 2 if keep_new else 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_loaders_recover_a_cut_swap_of_best(tmp_path):
    _swap_cut(tmp_path / "run", keep_new=True)
    (tmp_path / "run" / ".last.old").rename(tmp_path / "run" / ".best.old")
    (tmp_path / "run" / ".last.tmp").rename(tmp_path / "run" / ".best.tmp")
    model, config = checkpoints.load_music(tmp_path / "run")
    assert config["metrics"]["epoch"] == 2 and (tmp_path / "run" / "best").is_dir()


def test_leftovers_beside_a_complete_folder_are_removed(tmp_path):
    model = _music()
    last = tmp_path / "last"
    checkpoints.save_checkpoint(last, model, {"kind": "music"}, {"e": 1})
    (tmp_path / ".last.tmp").mkdir()  # killed while writing the next copy
    (tmp_path / ".last.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".last.old").mkdir()  # killed before the old copy was removed
    assert checkpoints.recover(last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert checkpoints.load_trainer_state(last) == {"e": 1}
