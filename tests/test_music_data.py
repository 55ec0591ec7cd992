"""Music datasets: .mat, pitch lists, MIDI folders, music21 chorales, augmentation, baselines."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import scipy.io

from bbservice.errors import ConfigError, DataError
from bbservice.pianoroll import N_KEYS, pitches_to_roll
from training.music_data import (
    MusicSplits,
    augment_transpositions,
    count_predicted_frames,
    embedded_chorales,
    load_mat,
    load_midi_folder,
    load_music,
    load_pitch_lists,
    transpose,
    trivial_baseline_nll,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POLY = SHARED / "polyphonic"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found at {path}")
    return path


def _roll(length: int, keys: list[int]) -> np.ndarray:
    r = np.zeros((length, N_KEYS), np.uint8)
    r[:, keys] = 1
    return r


def _cell(seqs: list[np.ndarray]) -> np.ndarray:
    cell = np.empty((1, len(seqs)), dtype=object)
    for i, s in enumerate(seqs):
        cell[0, i] = s
    return cell


def _write_mat(path: Path, **keys: list[np.ndarray]) -> Path:
    scipy.io.savemat(str(path), {k: _cell(v) for k, v in keys.items()})
    return path


def _song(path: Path, pitch: int, beats: int = 4, drums: bool = True) -> None:
    """Two instruments plus a drum track, written with pretty_midi."""
    pm = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=100)
    sec = 60 / 100
    lead, bass = pretty_midi.Instrument(0), pretty_midi.Instrument(33)
    for b in range(beats):
        lead.notes.append(pretty_midi.Note(90, pitch + b % 3, b * sec, (b + 1) * sec))
    bass.notes.append(pretty_midi.Note(90, pitch - 24, 0, beats * sec))
    pm.instruments += [lead, bass]
    if drums:
        kit = pretty_midi.Instrument(0, is_drum=True)
        kit.notes.append(pretty_midi.Note(90, 36, 0, sec))
        pm.instruments.append(kit)
    pm.write(str(path))


@pytest.fixture
def midi_folder(tmp_path: Path) -> Path:
    root = tmp_path / "songs"
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(12):
        _song(root / f"song{i:02d}.mid", 48 + i)
    _song(root / "sub" / "nested.MIDI", 60)
    _song(root / "sub" / "deeper" / "deep.mid", 62)
    (root / "sub" / "empty.mid").write_bytes(b"")
    (root / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x02garbage")
    (root / "notes.mid").write_text("a text file named .mid\n")
    drums_only = pretty_midi.PrettyMIDI()
    kit = pretty_midi.Instrument(0, is_drum=True)
    kit.notes.append(pretty_midi.Note(90, 36, 0, 0.5))
    drums_only.instruments.append(kit)
    drums_only.write(str(root / "drums.mid"))
    (root / "readme.txt").write_text("not music")
    return root


# --- MIDI folders -----------------------------------------------------------------------------


def test_midi_folder_loads_skips_and_reports(midi_folder, caplog):
    with caplog.at_level(logging.WARNING):
        ds = load_midi_folder(midi_folder, frames_per_beat=2, valid_fraction=0.2, test_fraction=0.2)
    assert sum(ds.sizes()) == 14
    bad = {"sub/empty.mid", "corrupt.mid", "notes.mid", "drums.mid"}
    assert {name for name, _ in ds.skipped} == bad
    reasons = dict(ds.skipped)
    assert "empty" in reasons["sub/empty.mid"] and "corrupt" in reasons["corrupt.mid"]
    assert "corrupt" in reasons["notes.mid"] and "no notes" in reasons["drums.mid"]
    for name in bad:
        assert name in caplog.text
    all_names = sorted(n for s in ("train", "valid", "test") for n in ds.names[s])
    assert "sub/nested.MIDI" in all_names and "sub/deeper/deep.mid" in all_names
    for seq in ds.train + ds.valid + ds.test:
        assert seq.dtype == np.uint8 and seq.shape == (8, N_KEYS)  # 4 beats at 2 frames/beat
        assert seq[:, 36 - 21].sum() == 0 or seq[:, 36 - 21].all()  # no drum hit leaks in
    assert ds.frames_per_beat == 2 and ds.fps is None


def test_midi_folder_split_is_hash_of_relative_path(midi_folder, tmp_path):
    ds = load_midi_folder(midi_folder, valid_fraction=0.25, test_fraction=0.25, seed=3)
    for split, names in ds.names.items():
        for rel in names:
            digest = hashlib.sha1(f"3:{rel}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
            assert split == ("test" if u < 0.25 else "valid" if u < 0.5 else "train")
    again = load_midi_folder(midi_folder, valid_fraction=0.25, test_fraction=0.25, seed=3)
    assert again.names == ds.names
    for split in ("train", "valid", "test"):
        for a, b in zip(ds.split(split), again.split(split), strict=True):
            np.testing.assert_array_equal(a, b)
    # Adding a file moves no other file; another seed gives another split.
    _song(midi_folder / "zz_new.mid", 70)
    grown = load_midi_folder(midi_folder, valid_fraction=0.25, test_fraction=0.25, seed=3)
    for split in ("train", "valid", "test"):
        assert [n for n in grown.names[split] if n != "zz_new.mid"] == ds.names[split]
    other = load_midi_folder(midi_folder, valid_fraction=0.25, test_fraction=0.25, seed=4)
    assert other.names != grown.names


def test_midi_folder_fps_grid(midi_folder):
    ds = load_midi_folder(midi_folder, fps=5)
    assert ds.fps == 5 and ds.frames_per_beat is None
    assert {len(s) for s in ds.train + ds.valid + ds.test} == {12}  # 4 beats of 0.6 s


def test_midi_folder_errors(tmp_path, midi_folder):
    with pytest.raises(DataError, match="does not exist"):
        load_midi_folder(tmp_path / "nope")
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="no .mid"):
        load_midi_folder(tmp_path / "void")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.mid").write_bytes(b"")
    (junk / "b.midi").write_text("text")
    with pytest.raises(DataError, match="none of its 2 MIDI files"):
        load_midi_folder(junk)
    with pytest.raises(ConfigError):
        load_midi_folder(midi_folder, valid_fraction=0.6, test_fraction=0.5)


def test_nottingham_folder():
    folder = _need(SHARED / "midi" / "nottingham")
    started = time.perf_counter()
    ds = load_midi_folder(folder, frames_per_beat=4)
    elapsed = time.perf_counter() - started
    n_files = len(list(folder.rglob("*.mid")))
    assert sum(ds.sizes()) + len(ds.skipped) == n_files == 1034
    for name, reason in ds.skipped:  # none expected; if any, each is reported by name
        assert name.endswith(".mid") and name in reason
    assert min(ds.sizes()) > 50 and ds.sizes()[0] > 4 * ds.sizes()[1]
    assert all(s.dtype == np.uint8 and s.shape[1] == N_KEYS and s.any() for s in ds.train)
    assert elapsed < 60


# --- .mat and pitch lists ---------------------------------------------------------------------


def test_load_mat_generated(tmp_path):
    seqs = [_roll(5, [39, 43]), _roll(3, [0, 87])]
    path = _write_mat(tmp_path / "toy.mat", traindata=seqs, validdata=seqs[:1], testdata=seqs[1:])
    ds = load_mat(path)
    assert ds.sizes() == (2, 1, 1) and ds.name == "toy"
    np.testing.assert_array_equal(ds.train[0], seqs[0])
    assert ds.test[0].dtype == np.uint8


def test_load_mat_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mat(tmp_path / "none.mat")
    path = _write_mat(tmp_path / "partial.mat", traindata=[_roll(2, [1])])
    with pytest.raises(DataError) as e:
        load_mat(path)
    assert "partial.mat" in str(e.value) and "validdata, testdata" in str(e.value)
    wrong = [np.zeros((4, 87), np.uint8)]
    path = _write_mat(tmp_path / "narrow.mat", traindata=wrong, validdata=wrong, testdata=wrong)
    with pytest.raises(DataError, match=r"\(T, 88\)"):
        load_mat(path)
    (tmp_path / "bad.mat").write_text("not a mat file")
    with pytest.raises(DataError, match="bad.mat"):
        load_mat(tmp_path / "bad.mat")


def test_load_pitch_lists_json_and_pickle(tmp_path):
    data = {"train": [[[60, 64], [], [21, 108]]], "valid": [[[43]]], "test": [[[72.0], [20]]]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(data))
    for name in ("d.json", "d.pkl"):
        ds = load_pitch_lists(tmp_path / name)
        assert ds.sizes() == (1, 1, 1)
        np.testing.assert_array_equal(ds.train[0], pitches_to_roll(data["train"][0]))
        assert ds.test[0].sum() == 1  # 72 kept, 20 is off the keyboard


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[1, 2]", "must hold a dict"),
        ('{"train": []}', "lacks key(s) valid, test"),
        ('{"train": 3, "valid": [], "test": []}', "expected a list of sequences"),
        ('{"train": [[["C4"]]], "valid": [], "test": []}', "train[0][0]"),
        ('{"train": [], "valid": [5], "test": []}', "valid[0]"),
        ("{not json", "corrupt pitch-list file"),
    ],
)
def test_load_pitch_lists_errors(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_pitch_lists(path)
    assert words in str(e.value) and "bad.json" in str(e.value)


# --- augmentation and metrics -----------------------------------------------------------------


def test_transpose_drops_notes_off_the_keyboard():
    roll = _roll(2, [0, 40, 87])
    up = transpose(roll, 2)
    assert np.flatnonzero(up[0]).tolist() == [2, 42]
    down = transpose(roll, -1)
    assert np.flatnonzero(down[0]).tolist() == [39, 86]
    assert transpose(roll, 0) is not roll and (transpose(roll, 0) == roll).all()
    assert not transpose(roll, 88).any() and not transpose(roll, -100).any()
    aug = augment_transpositions([roll, _roll(1, [10])], shifts=range(-1, 2))
    assert len(aug) == 6 and (aug[1] == roll).all() and (aug[4] == _roll(1, [10])).all()


def test_baseline_and_frame_count_on_toy_data():
    train = [_roll(4, [0]), np.zeros((4, N_KEYS), np.uint8)]  # key 0 on in half the frames
    test = [_roll(3, [0]), np.zeros((1, N_KEYS), np.uint8)]
    ds = MusicSplits(train=train, valid=[], test=test, name="toy")
    assert count_predicted_frames(test) == 2 and count_predicted_frames([]) == 0
    eps = 1e-6
    per_frame = -math.log(0.5) - 87 * math.log(1 - eps)  # key 0 p=.5, others clipped to eps
    assert trivial_baseline_nll(ds, eps=eps) == pytest.approx(per_frame)
    with pytest.raises(DataError):
        trivial_baseline_nll(ds, split="valid")


# --- the one entry point ----------------------------------------------------------------------


def test_load_music_dispatch(tmp_path, midi_folder, monkeypatch):
    seqs = [_roll(3, [5])]
    poly = tmp_path / "root" / "polyphonic"
    poly.mkdir(parents=True)
    _write_mat(poly / "JSB_Chorales.mat", traindata=seqs, validdata=seqs, testdata=seqs)
    ds = load_music("JSB", data_root=tmp_path / "root")
    assert ds.sizes() == (1, 1, 1) and ds.frames_per_beat == 1
    monkeypatch.setenv("BBSERVICE_DATA", str(tmp_path / "root"))
    assert load_music("jsb").sizes() == (1, 1, 1)
    with pytest.raises(DataError, match="Nottingham.mat"):
        load_music("nottingham")
    assert load_music(poly / "JSB_Chorales.mat").sizes() == (1, 1, 1)
    (tmp_path / "p.json").write_text(json.dumps({"train": [], "valid": [], "test": [[[60]]]}))
    assert load_music(str(tmp_path / "p.json")).sizes() == (0, 0, 1)
    assert sum(load_music(midi_folder, frames_per_beat=1).sizes()) == 14
    with pytest.raises(DataError, match="neither an existing path"):
        load_music(tmp_path / "missing.mat")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="unknown suffix"):
        load_music(tmp_path / "x.csv")


# --- the real benchmarks (README facts) -------------------------------------------------------


def test_jsb_mat_facts():
    ds = load_music(_need(POLY / "JSB_Chorales.mat"))
    assert ds.sizes() == (229, 76, 77)
    frames = [count_predicted_frames(ds.split(s)) for s in ("train", "valid", "test")]
    assert frames == [13_578, 4_526, 4_648]
    assert all(s.dtype == np.uint8 and s.shape[1] == N_KEYS for s in ds.train)
    assert trivial_baseline_nll(ds) == pytest.approx(11.09, abs=0.02)


def test_jsb_json_matches_mat():
    js = load_pitch_lists(_need(POLY / "jsb-chorales-quarter.json"))
    mat = load_mat(_need(POLY / "JSB_Chorales.mat"))
    assert js.sizes() == (229, 76, 77)
    for split in ("train", "valid", "test"):
        for a, b in zip(js.split(split), mat.split(split), strict=True):
            np.testing.assert_array_equal(a, b)


# --- music21 chorales -------------------------------------------------------------------------


def test_chorales_subset_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BBSERVICE_CACHE", str(tmp_path / "cache"))
    first = embedded_chorales(limit=12)
    files = list((tmp_path / "cache").glob("chorales-music21-*-limit12-*.npz"))
    assert len(files) == 1
    assert sum(first.sizes()) == 12 and first.frames_per_beat == 1
    for seq in first.train + first.valid + first.test:
        assert seq.dtype == np.uint8 and seq.shape[1] == N_KEYS
        assert 3 <= np.median(seq.sum(axis=1)) <= 4  # four voices, merged
    started = time.perf_counter()
    cached = embedded_chorales(limit=12)
    assert time.perf_counter() - started < 1.0
    assert cached.names == first.names
    for split in ("train", "valid", "test"):
        for a, b in zip(first.split(split), cached.split(split), strict=True):
            np.testing.assert_array_equal(a, b)
    files[0].write_bytes(b"broken cache")
    rebuilt = embedded_chorales(limit=12)
    assert rebuilt.names == first.names


@pytest.mark.slow
def test_all_chorales(tmp_path):
    ds = load_music("chorales", cache_dir=tmp_path)
    n = sum(ds.sizes())
    assert n >= 300
    assert ds.sizes()[0] > 0.6 * n and min(ds.sizes()[1:]) > 0.08 * n
    assert 9.0 < trivial_baseline_nll(ds) < 14.0
