"""Binary 88-key piano rolls and MIDI files, without torch (numpy, pretty_midi, Pillow only).

A roll is a ``(T, 88)`` uint8 array of 0/1; column ``k`` is MIDI pitch ``21 + k`` (A0..C8) and
row ``t`` is frame ``t`` of a regular grid, either ``frames_per_beat`` frames per quarter note
(following the file's tempo map) or ``fps`` frames per second.

Grid rule: a note covers the frames whose grid time lies in ``[start, end)``. MIDI stores times in
whole ticks, so a note boundary within half a tick of a grid point counts as on it.

Binary rolls cannot tell a sustained note from the same key struck again in the next frame:
``roll_to_midi`` writes each run of consecutive active frames of a key as one note, so a key
released for at least one frame and struck again survives a round trip, while a re-strike without
a gap in between comes back as one long note (the roll itself is unchanged either way).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pretty_midi
from PIL import Image

from bbservice.errors import ConfigError, DataError, TooLargeError, first_line

N_KEYS = 88
LOWEST_PITCH = 21

_TOL_TICKS = 0.5 + 1e-6  # boundary snapping, in MIDI ticks (times are stored in whole ticks)
_MAX_RESOLUTION = 32767  # MIDI division is a 15-bit number


def _check_grid(frames_per_beat: float | None, fps: float | None) -> None:
    if (frames_per_beat is None) == (fps is None):
        raise ConfigError("give exactly one of frames_per_beat= or fps= for the piano-roll grid")
    value = frames_per_beat if fps is None else fps
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"grid rate must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Grid:
    """The time grid of a roll: ``frames_per_beat`` frames per quarter note (following the
    file's tempo map) or ``fps`` frames per second; exactly one is set.

    On disk (export manifests, checkpoint configs, service answers) it stays the dict
    ``{"frames_per_beat": n}`` or ``{"fps": r}`` (:meth:`to_dict`, :meth:`from_dict`); the
    functions below that take ``frames_per_beat=`` / ``fps=`` accept ``**grid.to_dict()``.
    """

    frames_per_beat: float | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        _check_grid(self.frames_per_beat, self.fps)

    @classmethod
    def from_dict(cls, data: dict) -> Grid:
        """``{"frames_per_beat": n}`` or ``{"fps": r}`` (as written in a manifest)."""
        return cls(data.get("frames_per_beat"), data.get("fps"))

    @classmethod
    def of_checkpoint(cls, config: dict) -> Grid:
        """The grid a music checkpoint was trained on (its config's ``data`` section; one frame
        per quarter note when the config says nothing)."""
        data = config.get("data", {}) if isinstance(config, dict) else {}
        if data.get("fps"):
            return cls(fps=data["fps"])
        return cls(frames_per_beat=data.get("frames_per_beat") or 1)

    def to_dict(self) -> dict[str, float]:
        if self.fps is not None:
            return {"fps": self.fps}
        return {"frames_per_beat": self.frames_per_beat}

    def seconds_per_frame(self, tempo: float) -> float:
        """Length of a frame in seconds at ``tempo`` quarter notes per minute, as a MIDI file
        written by :func:`roll_to_midi` stores it (its tempo is a whole number of µs a beat)."""
        if self.fps is not None:
            return 1.0 / self.fps
        stored_tempo = 6e7 / max(1, round(6e7 / tempo))
        return 60.0 / (stored_tempo * self.frames_per_beat)

    def pause_frames(self) -> int:
        """The silence between pieces: a bar of 4 beats, or 2 seconds on a time grid."""
        if self.fps is not None:
            return round(2 * self.fps)
        return round(4 * self.frames_per_beat)

    def length_of(self, pm: pretty_midi.PrettyMIDI) -> float:
        """How many frames of this grid a parsed MIDI file lasts."""
        end = pm.get_end_time()
        if self.fps is not None:
            return end * self.fps
        return pm.time_to_tick(end) / pm.resolution * self.frames_per_beat


def _check_roll(roll: np.ndarray) -> np.ndarray:
    arr = np.asarray(roll)
    if arr.ndim != 2 or arr.shape[1] != N_KEYS:
        raise ConfigError(f"a piano roll must have shape (T, {N_KEYS}), got {arr.shape}")
    return (arr != 0).astype(np.uint8)


def _ticks_at(pm: pretty_midi.PrettyMIDI, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map times (s) to fractional MIDI ticks through the tempo map.

    Returns
    -------
    ticks, seconds_per_tick : np.ndarray, np.ndarray
        Both of the shape of ``times``.
    """
    change_times, tempi = pm.get_tempo_changes()
    if len(change_times) == 0:
        change_times, tempi = np.zeros(1), np.array([120.0])
    tick_rate = tempi * pm.resolution / 60.0  # ticks per second in each tempo segment
    change_ticks = np.concatenate([[0.0], np.cumsum(np.diff(change_times) * tick_rate[:-1])])
    change_ticks = change_ticks + change_times[0] * tick_rate[0]
    seg = np.clip(np.searchsorted(change_times, times, side="right") - 1, 0, None)
    ticks = change_ticks[seg] + (times - change_times[seg]) * tick_rate[seg]
    return ticks, 1.0 / tick_rate[seg]


def _frame_positions(
    pm: pretty_midi.PrettyMIDI,
    times: np.ndarray,
    frames_per_beat: float | None,
    fps: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fractional frame positions of ``times`` and the half-tick snapping tolerance, in frames."""
    ticks, sec_per_tick = _ticks_at(pm, times)
    if frames_per_beat is not None:
        pos = ticks * frames_per_beat / pm.resolution
        tol = np.full_like(pos, _TOL_TICKS * frames_per_beat / pm.resolution)
    else:
        pos = times * fps
        tol = _TOL_TICKS * sec_per_tick * fps
    return pos, tol


def midi_to_roll(
    midi: str | os.PathLike | pretty_midi.PrettyMIDI,
    *,
    frames_per_beat: float | None = None,
    fps: float | None = None,
) -> np.ndarray:
    """Piano roll of a MIDI file: drums left out, other instruments merged, 88 keys kept.

    Parameters
    ----------
    midi : path or pretty_midi.PrettyMIDI
    frames_per_beat : float, optional
        Frames per quarter note; frame ``i`` lies at tick ``i * resolution / frames_per_beat``,
        mapped to seconds through the file's tempo changes (so for 4/4 and ``frames_per_beat=1``
        the frame times are ``pm.get_beats()``).
    fps : float, optional
        Frames per second instead. Exactly one of the two must be given.

    Returns
    -------
    np.ndarray
        ``(T, 88)`` uint8; ``T`` spans the file up to its end time (last note or event).
    """
    _check_grid(frames_per_beat, fps)
    pm = midi if isinstance(midi, pretty_midi.PrettyMIDI) else pretty_midi.PrettyMIDI(str(midi))
    notes = [
        (n.start, n.end, n.pitch)
        for inst in pm.instruments
        if not inst.is_drum
        for n in inst.notes
        if LOWEST_PITCH <= n.pitch < LOWEST_PITCH + N_KEYS
    ]
    end_pos, end_tol = _frame_positions(pm, np.array([pm.get_end_time()]), frames_per_beat, fps)
    n_frames = max(int(math.ceil(end_pos[0] - end_tol[0])), 0)
    if notes:
        arr = np.asarray(notes, dtype=np.float64)
        s_pos, s_tol = _frame_positions(pm, arr[:, 0], frames_per_beat, fps)
        e_pos, e_tol = _frame_positions(pm, arr[:, 1], frames_per_beat, fps)
        lo = np.maximum(np.ceil(s_pos - s_tol), 0).astype(np.int64)
        hi = np.ceil(e_pos - e_tol).astype(np.int64)
        n_frames = max(n_frames, int(hi.max(initial=0)))
    roll = np.zeros((n_frames, N_KEYS), dtype=np.uint8)
    if notes:
        keys = arr[:, 2].astype(np.int64) - LOWEST_PITCH
        # Difference array: +1 at each note's first frame, -1 after its last, then a cumulative sum.
        diff = np.zeros((n_frames + 1, N_KEYS), dtype=np.int32)
        ok = hi > lo
        np.add.at(diff, (lo[ok], keys[ok]), 1)
        np.add.at(diff, (hi[ok], keys[ok]), -1)
        roll[:] = np.cumsum(diff, axis=0)[:n_frames] > 0
    return roll


def _resolution(ticks_per_frame_per_unit: Fraction) -> int:
    """A MIDI resolution making one frame a whole number (>= 2) of ticks where possible.

    With frames of more than one tick, the half-tick snapping of :func:`midi_to_roll` recovers
    every grid boundary even when a frame is not a whole number of ticks.
    """
    den = ticks_per_frame_per_unit.denominator
    if den > _MAX_RESOLUTION:
        want = max(960, math.ceil(4 / float(ticks_per_frame_per_unit)))
        return min(want, _MAX_RESOLUTION)
    res = den * max(1, -(-480 // den), math.ceil(2 / (den * ticks_per_frame_per_unit)))
    return res if res <= _MAX_RESOLUTION else den


def _exact_tempo(tempo: float, resolution: int) -> float:
    """The tempo near ``tempo`` that the MIDI file stores exactly (whole microseconds/quarter).

    pretty_midi writes ``int(6e7 / (60 / (tick_scale * resolution)))`` with
    ``tick_scale = 60 / (tempo * resolution)``; step down by ulps until that truncation gives the
    intended integer, so writer and reader use the same tempo.
    """
    mpq = max(1, round(6e7 / tempo))
    value = 6e7 / mpq
    for _ in range(64):
        tick_scale = 60.0 / (value * resolution)
        if int(6e7 / (60.0 / (tick_scale * resolution))) == mpq:
            break
        value = float(np.nextafter(value, 0.0))
    return value


def roll_to_midi(
    roll: np.ndarray,
    *,
    tempo: float = 120.0,
    frames_per_beat: float | None = None,
    fps: float | None = None,
    program: int = 0,
    velocity: int = 80,
) -> pretty_midi.PrettyMIDI:
    """MIDI for a piano roll: each run of consecutive active frames of a key becomes one note.

    Parameters
    ----------
    roll : np.ndarray
        ``(T, 88)``, nonzero = key down.
    tempo : float
        Quarter notes per minute (rounded to what MIDI stores: whole microseconds per quarter).
    frames_per_beat, fps : float, optional
        The grid, exactly one of the two (as in :func:`midi_to_roll`).
    program, velocity : int
        General MIDI program (0 = acoustic grand) and note velocity, 0..127 / 1..127.

    Returns
    -------
    pretty_midi.PrettyMIDI
        One instrument; trailing silent frames are kept with a text event "end" at frame ``T``,
        so ``midi_to_roll`` on the same grid gives back ``roll`` exactly.
    """
    _check_grid(frames_per_beat, fps)
    roll = _check_roll(roll)
    if not (isinstance(tempo, int | float) and math.isfinite(tempo) and tempo > 0):
        raise ConfigError(f"tempo must be a positive number of quarter notes per minute: {tempo!r}")
    if not 0 <= int(program) <= 127 or not 1 <= int(velocity) <= 127:
        raise ConfigError(f"program must be 0..127 and velocity 1..127: {program}, {velocity}")
    mpq = max(1, round(6e7 / tempo))  # what the file stores: microseconds per quarter note
    if frames_per_beat is not None:
        resolution = _resolution(1 / Fraction(frames_per_beat).limit_denominator(10**6))
    else:
        resolution = _resolution(Fraction(10**6, mpq) / Fraction(fps).limit_denominator(10**6))
    tempo = _exact_tempo(6e7 / mpq, resolution)
    sec_per_frame = 60.0 / (tempo * frames_per_beat) if fps is None else 1.0 / fps
    pm = pretty_midi.PrettyMIDI(resolution=resolution, initial_tempo=tempo)
    inst = pretty_midi.Instrument(program=int(program), name="piano roll")
    n_frames = roll.shape[0]
    padded = np.zeros((n_frames + 2, N_KEYS), dtype=np.int8)
    padded[1:-1] = roll
    edges = np.diff(padded, axis=0).T  # (88, T+1): +1 at a run's first frame, -1 one past its last
    # nonzero walks key by key and in time order, so the k-th start and k-th end pair up.
    keys, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    for k, lo, hi in zip(keys, starts, ends, strict=True):
        inst.notes.append(
            pretty_midi.Note(
                velocity=int(velocity),
                pitch=int(k) + LOWEST_PITCH,
                start=float(lo) * sec_per_frame,
                end=float(hi) * sec_per_frame,
            )
        )
    pm.instruments.append(inst)
    if n_frames and not roll[-1].any():
        pm.text_events.append(pretty_midi.Text("end", n_frames * sec_per_frame))
    return pm


def midi_bytes(roll: np.ndarray, **kwargs) -> bytes:
    """Standard MIDI file bytes of ``roll``; keyword arguments as in :func:`roll_to_midi`."""
    buf = io.BytesIO()
    roll_to_midi(roll, **kwargs).write(buf)
    return buf.getvalue()


def write_midi(roll: np.ndarray, path: str | os.PathLike, **kwargs) -> Path:
    """Write ``roll`` as a MIDI file (keyword arguments as in :func:`roll_to_midi`)."""
    out = Path(path)
    out.write_bytes(midi_bytes(roll, **kwargs))
    return out


def pitches_to_roll(frames: Sequence[Iterable[int]]) -> np.ndarray:
    """Roll from a list of frames, each the MIDI pitches sounding then.

    Returns
    -------
    np.ndarray
        ``(len(frames), 88)`` uint8; pitches outside 21..108 are dropped.
    """
    roll = np.zeros((len(frames), N_KEYS), dtype=np.uint8)
    for t, frame in enumerate(frames):
        keys = np.asarray(list(frame), dtype=np.int64).reshape(-1) - LOWEST_PITCH
        roll[t, keys[(keys >= 0) & (keys < N_KEYS)]] = 1
    return roll


def roll_to_pitches(roll: np.ndarray) -> list[list[int]]:
    """Inverse of :func:`pitches_to_roll`: per frame, the sorted sounding MIDI pitches."""
    roll = _check_roll(roll)
    return [[int(k) + LOWEST_PITCH for k in np.flatnonzero(row)] for row in roll]


def roll_to_png(
    roll: np.ndarray, path: str | os.PathLike | None = None, *, scale: int = 4
) -> bytes:
    """Draw a roll: time on x, pitch on y (low pitches at the bottom), ``scale`` px per cell.

    Active cells are black on white; the C keys get a faint grey guide line.

    Returns
    -------
    bytes
        The PNG, ``max(T, 1) * scale`` wide and ``88 * scale`` high; also written to ``path``
        if given.
    """
    roll = _check_roll(roll)
    if not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"scale must be a positive integer, got {scale!r}")
    img = np.full((N_KEYS, max(roll.shape[0], 1)), 255, dtype=np.uint8)
    c_keys = [k for k in range(N_KEYS) if (k + LOWEST_PITCH) % 12 == 0]
    img[[N_KEYS - 1 - k for k in c_keys], :] = 225
    img[::-1][roll.T.astype(bool)] = 0  # row 0 of the image is the highest key
    pic = Image.fromarray(img).resize(
        (img.shape[1] * scale, N_KEYS * scale), Image.Resampling.NEAREST
    )
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def load_midi_roll(
    path: str | os.PathLike,
    *,
    frames_per_beat: float | None = None,
    fps: float | None = None,
) -> np.ndarray:
    """:func:`midi_to_roll` of a file, with one-line :class:`DataError` messages.

    Raises
    ------
    DataError
        The file is missing, empty, not parseable as MIDI, or has no notes on the 88 keys
        (drums left out).
    ConfigError
        The grid arguments are wrong.
    """
    _check_grid(frames_per_beat, fps)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"MIDI file '{p}' does not exist or is not a file")
    if p.stat().st_size == 0:
        raise DataError(f"empty MIDI file '{p}': 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # e.g. tempo events on other tracks
            pm = pretty_midi.PrettyMIDI(str(p))
    except Exception as exc:  # mido/pretty_midi raise many types for bad bytes
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"corrupt MIDI file '{p}': {msg[:200]}") from exc
    roll = midi_to_roll(pm, frames_per_beat=frames_per_beat, fps=fps)
    if not roll.any():
        raise DataError(f"MIDI file '{p}' has no notes on the 88 piano keys (drums left out)")
    return roll


# -- primers and generated music (the service and the generate command) --------------------------


class PrimerTooLargeError(TooLargeError):
    """A primer file larger than the byte limit (HTTP 413)."""


def parse_primer(
    path: str | os.PathLike, grid: Grid, *, max_bytes: int, max_frames: int
) -> np.ndarray:
    """The roll ``(T, 88)`` of an uploaded primer MIDI file, ``T <= max_frames``.

    Raises
    ------
    PrimerTooLargeError
        More than ``max_bytes`` bytes.
    DataError
        Empty, not MIDI, longer than ``max_frames`` frames, or no notes on the 88 keys. The
        messages start with ``primer:``.
    """
    size = Path(path).stat().st_size
    if size == 0:
        raise DataError("primer: file is empty (0 bytes)")
    if size > max_bytes:
        raise PrimerTooLargeError(f"primer: {size} bytes, more than the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = pretty_midi.PrettyMIDI(str(path))
            frames = grid.length_of(pm)
    except Exception as err:  # mido / pretty_midi raise many types on bad bytes
        raise DataError(f"primer: not a MIDI file or corrupt ({first_line(err)[:160]})") from err
    if not math.isfinite(frames) or frames > max_frames + 1:
        raise DataError(
            f"primer: about {frames:.0f} frames long, more than the limit of {max_frames} frames"
        )
    roll = midi_to_roll(pm, **grid.to_dict())
    if not roll.any():
        raise DataError("primer: no notes on the 88 piano keys (drums are left out)")
    return roll[:max_frames]


def rolls_to_midi_bytes(
    rolls: Sequence[np.ndarray], grid: Grid, *, tempo: float, stamp: str
) -> bytes:
    """One MIDI file of several rolls, a :meth:`Grid.pause_frames` silence apart.

    ``stamp`` becomes a text event at time 0; with more than one roll, each piece starts at a
    text event ``"output k"``.
    """
    gap = grid.pause_frames()
    pieces, starts, at = [], [], 0
    for k, roll in enumerate(rolls):
        if k:
            pieces.append(np.zeros((gap, N_KEYS), dtype=np.uint8))
            at += gap
        starts.append(at)
        pieces.append(roll)
        at += len(roll)
    pm = roll_to_midi(np.concatenate(pieces), tempo=tempo, **grid.to_dict())
    pm.text_events.append(pretty_midi.Text(stamp, 0.0))
    if len(rolls) > 1:
        spf = grid.seconds_per_frame(tempo)
        pm.text_events.extend(
            pretty_midi.Text(f"output {k}", s * spf) for k, s in enumerate(starts)
        )
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


def roll_notes(roll: np.ndarray, seconds_per_frame: float) -> list[dict[str, float]]:
    """The notes of a roll, by start then pitch: MIDI ``pitch``, ``start_frame`` /
    ``end_frame`` (end exclusive) and ``start`` / ``end`` in seconds (6 decimals)."""
    padded = np.zeros((len(roll) + 2, N_KEYS), dtype=np.int8)
    padded[1:-1] = roll
    edges = np.diff(padded, axis=0).T  # (88, T + 1)
    keys, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    order = np.lexsort((keys, starts))
    return [
        {
            "pitch": int(keys[i]) + LOWEST_PITCH,
            "start_frame": int(starts[i]),
            "end_frame": int(ends[i]),
            "start": round(float(starts[i]) * seconds_per_frame, 6),
            "end": round(float(ends[i]) * seconds_per_frame, 6),
        }
        for i in order
    ]
