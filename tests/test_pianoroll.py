"""Piano rolls <-> MIDI: grids, tempo maps, round trips, PNG, and one-line DataErrors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import pytest
from PIL import Image

from bbservice.errors import ConfigError, DataError
from bbservice.pianoroll import (
    LOWEST_PITCH,
    N_KEYS,
    load_midi_roll,
    midi_bytes,
    midi_to_roll,
    pitches_to_roll,
    roll_to_midi,
    roll_to_pitches,
    roll_to_png,
    write_midi,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RES = 480


def _roundtrip(roll: np.ndarray, **kwargs) -> np.ndarray:
    grid = {k: v for k, v in kwargs.items() if k in ("frames_per_beat", "fps")}
    pm = pretty_midi.PrettyMIDI(io.BytesIO(midi_bytes(roll, **kwargs)))
    return midi_to_roll(pm, **grid)


def _tempo_change_file(path: Path) -> Path:
    """Type-1 MIDI: 120 qpm for 2 beats then 60 qpm; piano, strings (program 40), and drums.

    Piano: C4 beats 0-1, E4 beats 1-3, A0 (lowest key) beat 3-4, pitch 10 (off the keyboard).
    Strings: G4 beats 2-4. Drums (channel 9): 36 and 38 every beat (must be left out).
    """
    mid = mido.MidiFile(type=1, ticks_per_beat=RES)
    meta = mido.MidiTrack(
        [
            mido.MetaMessage("set_tempo", tempo=500000, time=0),
            mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0),
            mido.MetaMessage("set_tempo", tempo=1000000, time=2 * RES),
        ]
    )

    def track(channel: int, program: int, notes: list[tuple[int, float, float]]) -> mido.MidiTrack:
        events = []
        for pitch, a, b in notes:
            events.append((round(a * RES), 1, mido.Message("note_on", note=pitch, velocity=90)))
            events.append((round(b * RES), 0, mido.Message("note_off", note=pitch, velocity=0)))
        events.sort(key=lambda e: (e[0], e[1]))
        tr = mido.MidiTrack([mido.Message("program_change", program=program, channel=channel)])
        now = 0
        for tick, _, msg in events:
            tr.append(msg.copy(channel=channel, time=tick - now))
            now = tick
        return tr

    mid.tracks += [
        meta,
        track(0, 0, [(60, 0, 1), (64, 1, 3), (21, 3, 4), (10, 0, 4)]),
        track(1, 40, [(67, 2, 4)]),
        track(9, 0, [(36, b, b + 0.5) for b in range(4)] + [(38, 3.5, 4)]),
    ]
    mid.save(str(path))
    return path


def test_constants():
    assert N_KEYS == 88 and LOWEST_PITCH == 21


def test_tempo_map_beats_grid(tmp_path):
    f = _tempo_change_file(tmp_path / "tempo.mid")
    pm = pretty_midi.PrettyMIDI(str(f))
    assert len(pm.get_tempo_changes()[0]) == 2
    roll = midi_to_roll(f, frames_per_beat=2)
    assert roll.shape == (8, N_KEYS) and roll.dtype == np.uint8
    expect = np.zeros((8, N_KEYS), np.uint8)
    expect[0:2, 60 - 21] = 1
    expect[2:6, 64 - 21] = 1
    expect[6:8, 0] = 1
    expect[4:8, 67 - 21] = 1
    np.testing.assert_array_equal(roll, expect)  # drums and pitch 10 left out
    # frames_per_beat=1 frames sit on pretty_midi's beats (4/4): 0, 0.5, 1.0, 2.0 s.
    np.testing.assert_allclose(pm.get_beats()[:4], [0.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(midi_to_roll(pm, frames_per_beat=1), expect[::2])


def test_fps_grid_follows_seconds(tmp_path):
    f = _tempo_change_file(tmp_path / "tempo.mid")
    roll = midi_to_roll(f, fps=4)  # beats at 0, .5, 1, 2, 3 s -> 12 frames of 0.25 s
    assert roll.shape == (12, N_KEYS)
    np.testing.assert_array_equal(np.flatnonzero(roll[:, 60 - 21]), [0, 1])
    np.testing.assert_array_equal(np.flatnonzero(roll[:, 64 - 21]), np.arange(2, 8))
    np.testing.assert_array_equal(np.flatnonzero(roll[:, 0]), np.arange(8, 12))


def test_note_covers_grid_times_in_half_open_interval():
    pm = pretty_midi.PrettyMIDI(resolution=RES, initial_tempo=120)
    inst = pretty_midi.Instrument(0)
    inst.notes += [
        pretty_midi.Note(80, 60, 0.10, 0.50),  # covers grid time 0.25 only (0.5 excluded)
        pretty_midi.Note(80, 62, 0.50, 0.55),  # starts on a grid point: covers 0.5
        pretty_midi.Note(80, 64, 0.80, 0.90),  # no grid point inside: no frame
    ]
    pm.instruments.append(inst)
    roll = midi_to_roll(pm, fps=4)
    assert roll.shape == (4, N_KEYS)
    assert roll_to_pitches(roll) == [[], [60], [62], []]


@pytest.mark.parametrize(
    "grid",
    [
        {"frames_per_beat": 4, "tempo": 97.0},
        {"frames_per_beat": 3, "tempo": 133.0},
        {"frames_per_beat": 1},
        {"fps": 10},
        {"fps": 44.1, "tempo": 173.3},
        {"fps": 86.13, "tempo": 97.0},
    ],
)
def test_roundtrip_exact_on_grid(grid):
    rng = np.random.default_rng(0)
    for length in (0, 1, 37, 400):
        roll = (rng.random((length, N_KEYS)) < 0.08).astype(np.uint8)
        if length > 5:
            roll[:2] = 0
            roll[-3:] = 0  # leading and trailing silence must survive too
        back = _roundtrip(roll, **grid)
        assert back.shape == roll.shape
        np.testing.assert_array_equal(back, roll)


def test_runs_become_notes_and_restrikes_survive():
    roll = np.zeros((7, N_KEYS), np.uint8)
    roll[0:3, 39] = 1  # one 3-frame note
    roll[4, 39] = 1  # released at frame 3, struck again at 4
    roll[6, 39] = 1
    roll[2:4, 0] = 1
    roll[3:5, 87] = 1
    pm = roll_to_midi(roll, frames_per_beat=2, tempo=90)
    notes = sorted((n.pitch, n.start, n.end) for n in pm.instruments[0].notes)
    sec = 60 / 90 / 2
    assert [(p, round(a / sec), round(b / sec)) for p, a, b in notes] == [
        (21, 2, 4),
        (60, 0, 3),
        (60, 4, 5),
        (60, 6, 7),
        (108, 3, 5),
    ]
    np.testing.assert_array_equal(_roundtrip(roll, frames_per_beat=2, tempo=90), roll)


def test_sustain_and_restrike_without_gap_are_one_note():
    """A binary roll cannot tell them apart: two struck notes back to back come back as one."""
    pm = pretty_midi.PrettyMIDI(resolution=RES, initial_tempo=120)
    inst = pretty_midi.Instrument(0)
    inst.notes += [pretty_midi.Note(80, 60, 0.0, 0.5), pretty_midi.Note(80, 60, 0.5, 1.0)]
    pm.instruments.append(inst)
    roll = midi_to_roll(pm, frames_per_beat=1)
    assert roll_to_pitches(roll) == [[60], [60]]
    assert len(roll_to_midi(roll, frames_per_beat=1).instruments[0].notes) == 1


def test_write_midi_and_bytes_agree(tmp_path):
    roll = np.zeros((5, N_KEYS), np.uint8)
    roll[1:4, 40] = 1
    out = write_midi(roll, tmp_path / "x.mid", fps=8, program=41, velocity=100)
    assert out.read_bytes() == midi_bytes(roll, fps=8, program=41, velocity=100)
    pm = pretty_midi.PrettyMIDI(str(out))
    assert pm.instruments[0].program == 41
    assert {n.velocity for n in pm.instruments[0].notes} == {100}
    np.testing.assert_array_equal(load_midi_roll(out, fps=8), roll)


def test_grid_and_argument_errors():
    roll = np.zeros((3, N_KEYS), np.uint8)
    pm = roll_to_midi(roll, fps=4)
    for bad in ({}, {"fps": 4, "frames_per_beat": 2}, {"fps": 0}, {"frames_per_beat": -1}):
        with pytest.raises(ConfigError):
            midi_to_roll(pm, **bad)
        with pytest.raises(ConfigError):
            roll_to_midi(roll, **bad)
    with pytest.raises(ConfigError):
        roll_to_midi(np.zeros((3, 87)), fps=4)
    with pytest.raises(ConfigError):
        roll_to_midi(roll, fps=4, velocity=0)


def test_pitches_roundtrip_and_range():
    frames = [[60, 64, 67], [], [21, 108], [20, 109, 43]]
    roll = pitches_to_roll(frames)
    assert roll.shape == (4, N_KEYS) and roll.dtype == np.uint8
    assert roll_to_pitches(roll) == [[60, 64, 67], [], [21, 108], [43]]
    assert pitches_to_roll([]).shape == (0, N_KEYS)


def test_png_orientation_and_size(tmp_path):
    roll = np.zeros((10, N_KEYS), np.uint8)
    roll[0, 0] = 1  # lowest key, first frame -> bottom-left
    roll[9, 87] = 1  # highest key, last frame -> top-right
    data = roll_to_png(roll, tmp_path / "r.png", scale=3)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "r.png").read_bytes() == data
    img = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert img.shape == (88 * 3, 10 * 3)
    assert img[-1, 0] == 0 and img[0, -1] == 0
    assert img[-1, -1] > 0 and img[0, 0] > 0
    assert (img == 0).sum() == 2 * 9
    empty = Image.open(io.BytesIO(roll_to_png(np.zeros((0, N_KEYS)), None, scale=2)))
    assert empty.size == (2, 88 * 2)


def _one_line(exc: pytest.ExceptionInfo, name: str, words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and name in msg and words in msg, msg


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_midi_roll(tmp_path / "missing.mid", frames_per_beat=4)
    _one_line(e, "missing.mid", "does not exist")
    (tmp_path / "empty.mid").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_midi_roll(tmp_path / "empty.mid", frames_per_beat=4)
    _one_line(e, "empty.mid", "empty")
    (tmp_path / "text.mid").write_text("this is not\na MIDI file\n")
    with pytest.raises(DataError) as e:
        load_midi_roll(tmp_path / "text.mid", frames_per_beat=4)
    _one_line(e, "text.mid", "corrupt MIDI file")
    good = midi_bytes(np.ones((8, N_KEYS), np.uint8), frames_per_beat=4)
    (tmp_path / "cut.mid").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as e:
        load_midi_roll(tmp_path / "cut.mid", frames_per_beat=4)
    _one_line(e, "cut.mid", "corrupt MIDI file")
    with pytest.raises(DataError) as e:
        load_midi_roll(tmp_path, frames_per_beat=4)
    _one_line(e, tmp_path.name, "not a file")


def test_load_file_without_notes(tmp_path):
    write_midi(np.zeros((4, N_KEYS), np.uint8), tmp_path / "silent.mid", fps=4)
    pm = pretty_midi.PrettyMIDI()
    drums = pretty_midi.Instrument(0, is_drum=True)
    drums.notes.append(pretty_midi.Note(100, 36, 0.0, 0.5))
    pm.instruments.append(drums)
    pm.write(str(tmp_path / "drums.mid"))
    for name in ("silent.mid", "drums.mid"):
        with pytest.raises(DataError) as e:
            load_midi_roll(tmp_path / name, fps=4)
        _one_line(e, name, "no notes")
    assert midi_to_roll(tmp_path / "silent.mid", fps=4).shape == (4, N_KEYS)


def test_module_is_torch_free():
    code = "import sys, bbservice.pianoroll; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_real_nottingham_files():
    folder = SHARED / "midi" / "nottingham"
    if not folder.is_dir():
        pytest.skip(f"reference data not found at {folder}")
    for f in sorted(folder.glob("*.mid"))[:5]:
        roll = load_midi_roll(f, frames_per_beat=4)
        assert roll.ndim == 2 and roll.shape[1] == N_KEYS and roll.any()
        np.testing.assert_array_equal(_roundtrip(roll, frames_per_beat=4), roll)


# -- the typed grid, primers and generated music ------------------------------------------------


def test_grid_is_typed_and_keeps_its_dict_form():
    from bbservice.pianoroll import Grid

    beats, seconds = Grid.from_dict({"frames_per_beat": 4}), Grid.from_dict({"fps": 10.0})
    assert beats.to_dict() == {"frames_per_beat": 4} and seconds.to_dict() == {"fps": 10.0}
    assert seconds.seconds_per_frame(120.0) == pytest.approx(0.1)
    assert beats.seconds_per_frame(120.0) == pytest.approx(0.125)  # 0.5 s a beat / 4
    assert (beats.pause_frames(), seconds.pause_frames()) == (16, 20)
    assert Grid.of_checkpoint({"data": {"fps": 8}}) == Grid(fps=8)
    assert Grid.of_checkpoint({}) == Grid(frames_per_beat=1)
    with pytest.raises(ConfigError, match="exactly one"):
        Grid(frames_per_beat=2, fps=3)


def test_parse_primer_limits_and_round_trip(tmp_path):
    from bbservice.errors import TooLargeError
    from bbservice.pianoroll import Grid, parse_primer

    grid = Grid(frames_per_beat=2)
    roll = np.zeros((6, N_KEYS), dtype=np.uint8)
    roll[1:4, 39] = 1
    path = tmp_path / "p.mid"
    path.write_bytes(midi_bytes(roll, frames_per_beat=2))
    got = parse_primer(path, grid, max_bytes=1 << 20, max_frames=64)
    assert np.array_equal(got, roll[: len(got)]) and got[1:4, 39].all()
    with pytest.raises(TooLargeError, match="more than the limit of 10 bytes"):
        parse_primer(path, grid, max_bytes=10, max_frames=64)
    with pytest.raises(DataError, match="more than the limit of 2 frames"):
        parse_primer(path, grid, max_bytes=1 << 20, max_frames=2)
    (tmp_path / "bad.mid").write_bytes(b"not midi")
    with pytest.raises(DataError, match="primer: not a MIDI file"):
        parse_primer(tmp_path / "bad.mid", grid, max_bytes=1 << 20, max_frames=64)


def test_rolls_to_midi_bytes_and_notes():
    import io

    from bbservice.pianoroll import Grid, roll_notes, rolls_to_midi_bytes

    grid = Grid(fps=4.0)
    roll = np.zeros((4, N_KEYS), dtype=np.uint8)
    roll[1:3, 39] = 1
    data = rolls_to_midi_bytes([roll, roll], grid, tempo=100.0, stamp="hello")
    pm = pretty_midi.PrettyMIDI(io.BytesIO(data))
    texts = [(t.text, round(t.time, 3)) for t in pm.text_events]
    assert ("hello", 0.0) in texts and ("output 1", round((4 + 8) * 0.25, 3)) in texts
    assert len(pm.instruments[0].notes) == 2
    notes = roll_notes(roll, grid.seconds_per_frame(100.0))
    assert notes == [{"pitch": 60, "start_frame": 1, "end_frame": 3, "start": 0.25, "end": 0.75}]
