"""Polyphonic-music datasets as lists of ``(T, 88)`` uint8 piano rolls (numpy, no torch).

Sources: the standard ``.mat`` benchmarks (JSB, Nottingham, MuseData, Piano-midi), the original
list-of-pitches JSON/pickle form, folders of MIDI files, and the Bach chorales shipped with
music21. :func:`load_music` picks the right loader from one string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bbservice.errors import ConfigError, DataError
from bbservice.pianoroll import LOWEST_PITCH, N_KEYS, load_midi_roll, pitches_to_roll

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MAT_KEYS = {"train": "traindata", "valid": "validdata", "test": "testdata"}
# Standard benchmark files under <data_root>/polyphonic/, and their frames per quarter note.
BENCHMARKS = {
    "jsb": ("JSB_Chorales.mat", 1.0),
    "nottingham": ("Nottingham.mat", 2.0),
    "musedata": ("MuseData.mat", 2.0),
    "piano-midi": ("Piano_midi.mat", 2.0),
}
_ALIASES = {"jsb-chorales": "jsb", "pianomidi": "piano-midi", "piano-midi-de": "piano-midi"}
_MIDI_SUFFIXES = (".mid", ".midi")
_CACHE_FORMAT = 1


@dataclass
class MusicSplits:
    """Train/valid/test piano rolls, each sequence a ``(T, 88)`` uint8 array of 0/1.

    ``names`` optionally holds one source name per sequence of each split; ``skipped`` lists the
    ``(file, reason)`` pairs a loader left out.
    """

    train: list[np.ndarray]
    valid: list[np.ndarray]
    test: list[np.ndarray]
    name: str
    description: str = ""
    frames_per_beat: float | None = None
    fps: float | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    names: dict[str, list[str]] = field(default_factory=dict)

    def split(self, which: str) -> list[np.ndarray]:
        """The sequences of ``which`` ('train', 'valid' or 'test')."""
        if which not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {which!r}")
        return getattr(self, which)

    def sizes(self) -> tuple[int, int, int]:
        """Number of sequences in train, valid, test."""
        return len(self.train), len(self.valid), len(self.test)


def count_predicted_frames(seqs: Iterable[np.ndarray]) -> int:
    """Frames a next-frame model predicts: ``sum(T - 1)`` over sequences of shape ``(T, 88)``."""
    return int(sum(max(len(s) - 1, 0) for s in seqs))


def trivial_baseline_nll(splits: MusicSplits, split: str = "test", eps: float = 1e-6) -> float:
    """Frame NLL (nats) of predicting every key with its train-set frequency.

    ``p_k`` is the fraction of all train frames where key ``k`` is on, clipped to
    ``[eps, 1 - eps]``; frames 2..T of each sequence of ``split`` are scored with 88 Bernoulli
    terms and the sum over the split is divided by its number of predicted frames.
    """
    if not splits.train:
        raise DataError(f"dataset '{splits.name}' has no train sequences for the baseline")
    p = np.concatenate(splits.train).astype(np.float64).mean(axis=0).clip(eps, 1.0 - eps)
    log_on, log_off = np.log(p), np.log1p(-p)
    total, frames = 0.0, 0
    for seq in splits.split(split):
        y = seq[1:].astype(np.float64)
        total -= float((y @ log_on + (1.0 - y) @ log_off).sum())
        frames += len(y)
    if frames == 0:
        raise DataError(f"split '{split}' of dataset '{splits.name}' has no predicted frames")
    return total / frames


def transpose(roll: np.ndarray, semitones: int) -> np.ndarray:
    """Shift a ``(T, 88)`` roll by ``semitones`` keys; notes pushed off the keyboard are dropped."""
    out = np.zeros_like(roll)
    s = int(semitones)
    if s == 0:
        out[:] = roll
    elif 0 < s < N_KEYS:
        out[:, s:] = roll[:, :-s]
    elif -N_KEYS < s < 0:
        out[:, :s] = roll[:, -s:]
    return out


def augment_transpositions(
    seqs: Sequence[np.ndarray], shifts: Iterable[int] = range(-3, 4)
) -> list[np.ndarray]:
    """Every sequence transposed by every shift (0 keeps the original), sequence-major order."""
    shifts = list(shifts)
    return [transpose(seq, s) for seq in seqs for s in shifts]


def _check_roll(arr: object, where: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[1] != N_KEYS:
        raise DataError(f"{where}: expected a (T, {N_KEYS}) piano roll, got shape {a.shape}")
    if a.dtype != np.uint8 and not np.isin(a, (0, 1)).all():
        raise DataError(f"{where}: piano-roll values must be 0 or 1")
    return (a != 0).astype(np.uint8)


def load_mat(path: str | os.PathLike) -> MusicSplits:
    """Load a benchmark ``.mat`` (keys traindata/validdata/testdata, 1×N cells of (T, 88))."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"music .mat file '{p}' does not exist")
    try:
        import scipy.io

        mat = scipy.io.loadmat(str(p))
    except Exception as exc:
        raise DataError(f"corrupt .mat file '{p}': {' '.join(str(exc).split())[:200]}") from exc
    missing = [k for k in MAT_KEYS.values() if k not in mat]
    if missing:
        raise DataError(f"music .mat file '{p}' lacks key(s) {', '.join(missing)}")
    out: dict[str, list[np.ndarray]] = {}
    for split, key in MAT_KEYS.items():
        cells = np.asarray(mat[key], dtype=object).reshape(-1)
        out[split] = [_check_roll(c, f"'{p}' {key}[{i}]") for i, c in enumerate(cells)]
    bench = {v[0].lower(): v[1] for v in BENCHMARKS.values()}
    return MusicSplits(
        **out,
        name=p.stem,
        description=f"piano rolls from {p.name}",
        frames_per_beat=bench.get(p.name.lower()),
    )


def _as_pitch(x: object) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating) and float(x).is_integer():
        return int(x)
    return None


def load_pitch_lists(path: str | os.PathLike) -> MusicSplits:
    """Load the list-of-pitches form: ``{"train": [[[60, 64], ...], ...], "valid", "test"}``.

    ``.json`` is read as JSON, anything else as a pickle (the original Boulanger-Lewandowski
    files; only load pickles you trust). Pitches outside the 88 keys are dropped.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pitch-list file '{p}' does not exist")
    try:
        with p.open("rb") as f:
            if p.suffix.lower() == ".json":
                data = json.load(f)
            else:
                data = pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise DataError(
            f"corrupt pitch-list file '{p}': {' '.join(str(exc).split())[:200]}"
        ) from exc
    if not isinstance(data, dict):
        raise DataError(f"pitch-list file '{p}' must hold a dict with train/valid/test")
    missing = [k for k in SPLITS if k not in data]
    if missing:
        raise DataError(f"pitch-list file '{p}' lacks key(s) {', '.join(missing)}")
    out: dict[str, list[np.ndarray]] = {}
    for split in SPLITS:
        seqs = data[split]
        if not isinstance(seqs, list | tuple):
            raise DataError(f"'{p}' {split}: expected a list of sequences")
        rolls = []
        for i, seq in enumerate(seqs):
            if not isinstance(seq, list | tuple):
                raise DataError(f"'{p}' {split}[{i}]: expected a list of frames")
            frames = []
            for t, frame in enumerate(seq):
                pitches = [_as_pitch(x) for x in frame] if isinstance(frame, list | tuple) else None
                if pitches is None or None in pitches:
                    raise DataError(f"'{p}' {split}[{i}][{t}]: not a list of MIDI pitches")
                frames.append(pitches)
            rolls.append(pitches_to_roll(frames))
        out[split] = rolls
    return MusicSplits(**out, name=p.stem, description=f"pitch lists from {p.name}")


def _hash_fraction(text: str) -> float:
    """Stable fraction in [0, 1): the first 8 bytes of ``sha1(text)`` over ``2**64``."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _assign_split(key: str, valid_fraction: float, test_fraction: float) -> str:
    u = _hash_fraction(key)
    return (
        "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction else "train"
    )


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    ok = 0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1
    if not ok:
        raise ConfigError(
            f"valid_fraction and test_fraction must be in [0, 1) with sum < 1, got "
            f"{valid_fraction} and {test_fraction}"
        )


def load_midi_folder(
    path: str | os.PathLike,
    *,
    frames_per_beat: float | None = 4,
    fps: float | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> MusicSplits:
    """All ``.mid``/``.midi`` files under ``path`` (recursive, sorted) as a split dataset.

    Split rule: ``u = int(sha1(f"{seed}:{rel}")[:8 bytes]) / 2**64`` with ``rel`` the file's
    POSIX path relative to ``path``; test if ``u < test_fraction``, valid if
    ``u < test_fraction + valid_fraction``, else train. Adding or removing files never moves
    the others. Missing, empty, corrupt or note-less files are logged, listed in ``skipped``
    and left out. A given ``fps`` (grid in seconds) overrides ``frames_per_beat``.

    Raises
    ------
    DataError
        ``path`` is not a folder, or it holds no usable MIDI file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"MIDI folder '{root}' does not exist or is not a folder")
    _check_fractions(valid_fraction, test_fraction)
    if fps is not None:
        frames_per_beat = None
    files = sorted(
        (f for f in root.rglob("*") if f.suffix.lower() in _MIDI_SUFFIXES and f.is_file()),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"MIDI folder '{root}' holds no .mid/.midi file")
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    skipped: list[tuple[str, str]] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            roll = load_midi_roll(f, frames_per_beat=frames_per_beat, fps=fps)
        except DataError as exc:
            log.warning("skipping %s: %s", rel, exc)
            skipped.append((rel, str(exc)))
            continue
        split = _assign_split(f"{seed}:{rel}", valid_fraction, test_fraction)
        out[split].append(roll)
        names[split].append(rel)
    if not any(out.values()):
        raise DataError(f"MIDI folder '{root}': none of its {len(files)} MIDI files is usable")
    grid = f"{frames_per_beat} frames/beat" if fps is None else f"{fps} frames/s"
    return MusicSplits(
        **out,
        name=root.name,
        description=f"{len(files) - len(skipped)} MIDI files from {root} at {grid}",
        frames_per_beat=frames_per_beat,
        fps=fps,
        skipped=skipped,
        names=names,
    )


def default_cache_dir() -> Path:
    """``$BBSERVICE_CACHE`` if set, else ``~/.cache/bbservice``."""
    env = os.environ.get("BBSERVICE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bbservice"


def _chorale_paths() -> list[tuple[str, Path]]:
    """(name, file) of the distinct Riemenschneider chorales in music21's corpus, sorted."""
    from music21 import corpus

    order = {".mxl": 0, ".xml": 1, ".musicxml": 1, ".krn": 2}
    found = {}
    for work in sorted(set(corpus.chorales.Iterator(returnType="filename"))):
        hits = corpus.getWork(work)
        hits = hits if isinstance(hits, list) else [hits]
        stem = work.rsplit("/", 1)[-1]
        exact = [Path(h) for h in hits if Path(h).stem == stem] or [Path(h) for h in hits]
        best = min(exact, key=lambda h: order.get(h.suffix, 9))
        found.setdefault(best.stem, best)
    return sorted(found.items())


def chorale_roll(path: str | os.PathLike, frames_per_beat: int = 1) -> np.ndarray:
    """Parse one score with music21 into a ``(T, 88)`` roll, all parts merged.

    Frame ``i`` lies at quarter-note offset ``i / frames_per_beat``; a note covers the frames in
    ``[offset, offset + quarterLength)``, so tied notes join up, rests and grace notes give
    nothing, and notes shorter than the grid that miss a grid point are dropped (as in JSB).
    """
    from music21 import converter

    score = converter.parseFile(str(path), forceSource=True, storePickle=False)
    n_frames = math.ceil(float(score.highestTime) * frames_per_beat - 1e-9)
    roll = np.zeros((max(n_frames, 0), N_KEYS), dtype=np.uint8)
    for n in score.flatten().notes:
        start = float(n.offset) * frames_per_beat
        end = start + float(n.quarterLength) * frames_per_beat
        lo, hi = math.ceil(start - 1e-9), min(math.ceil(end - 1e-9), n_frames)
        for pitch in n.pitches:
            k = pitch.midi - LOWEST_PITCH
            if 0 <= k < N_KEYS and hi > lo:
                roll[lo:hi, k] = 1
    return roll


def _save_npz(path: Path, splits: MusicSplits, version: str) -> None:
    arrays: dict[str, np.ndarray] = {"music21_version": np.array(version)}
    for s in SPLITS:
        seqs = splits.split(s)
        arrays[f"{s}_rolls"] = (
            np.concatenate(seqs) if seqs else np.zeros((0, N_KEYS), dtype=np.uint8)
        )
        arrays[f"{s}_lengths"] = np.array([len(x) for x in seqs], dtype=np.int64)
        arrays[f"{s}_names"] = np.array(splits.names.get(s, []), dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def _load_npz(path: Path) -> tuple[dict[str, list[np.ndarray]], dict[str, list[str]]]:
    seqs: dict[str, list[np.ndarray]] = {}
    names: dict[str, list[str]] = {}
    with np.load(path, allow_pickle=False) as z:
        for s in SPLITS:
            rolls, lengths = z[f"{s}_rolls"], z[f"{s}_lengths"]
            if rolls.ndim != 2 or rolls.shape[1] != N_KEYS or int(lengths.sum()) != len(rolls):
                raise ValueError(f"inconsistent {s} arrays")
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            seqs[s] = [
                rolls[a:b].astype(np.uint8) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            names[s] = [str(x) for x in z[f"{s}_names"]]
    return seqs, names


def embedded_chorales(
    cache_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    frames_per_beat: int = 1,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> MusicSplits:
    """Bach chorales shipped with music21, as rolls on a quarter-note grid (like JSB).

    The distinct files behind music21's Riemenschneider chorale iterator (sorted by name; the
    first ``limit`` only, if given) go through :func:`chorale_roll`; they are not transposed to
    a common key. Split: ``u = sha1(name)`` as in :func:`load_midi_folder` (name e.g.
    ``"bwv269"``), test if ``u < test_fraction``, valid below ``test + valid``, else train.
    The result is cached as ``.npz`` in ``cache_dir`` (default :func:`default_cache_dir`),
    keyed by the music21 version and the arguments; an unreadable cache is rebuilt.
    """
    import music21

    _check_fractions(valid_fraction, test_fraction)
    if int(frames_per_beat) != frames_per_beat or frames_per_beat < 1:
        raise ConfigError(f"frames_per_beat must be a positive integer, got {frames_per_beat!r}")
    version = str(music21.__version__)
    tag = f"fpb{int(frames_per_beat)}-v{valid_fraction}-t{test_fraction}"
    tag += f"-limit{int(limit)}" if limit is not None else ""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"chorales-music21-{version}-{tag}-c{_CACHE_FORMAT}.npz"
    meta = {
        "name": "music21-chorales",
        "frames_per_beat": float(frames_per_beat),
        "description": f"Bach chorales from music21 {version}, {frames_per_beat} frame(s)/quarter",
    }
    if cache_file.is_file():
        try:
            seqs, names = _load_npz(cache_file)
            return MusicSplits(**seqs, **meta, names=names)
        except Exception as exc:  # corrupt or stale cache: rebuild it
            log.warning("rebuilding chorale cache %s: %s", cache_file, exc)
    started = time.perf_counter()
    paths = _chorale_paths()[: limit if limit is not None else None]
    seqs = {s: [] for s in SPLITS}
    names = {s: [] for s in SPLITS}
    for name, path in paths:
        roll = chorale_roll(path, frames_per_beat)
        if not roll.any():
            continue
        split = _assign_split(name, valid_fraction, test_fraction)
        seqs[split].append(roll)
        names[split].append(name)
    result = MusicSplits(**seqs, **meta, names=names)
    log.info("parsed %d chorales in %.1f s", len(paths), time.perf_counter() - started)
    try:
        _save_npz(cache_file, result, version)
    except OSError as exc:
        log.warning("could not write chorale cache %s: %s", cache_file, exc)
    return result


def default_data_root() -> Path | None:
    """``$BBSERVICE_DATA`` if set, else ``<repo>/../shared/data`` if that folder exists."""
    env = os.environ.get("BBSERVICE_DATA")
    if env:
        return Path(env).expanduser()
    guess = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return guess if guess.is_dir() else None


def load_music(
    spec: str | os.PathLike, *, data_root: str | os.PathLike | None = None, **kwargs
) -> MusicSplits:
    """One entry point for every music source.

    Parameters
    ----------
    spec : str or path
        ``"chorales"`` (music21's Bach chorales); a benchmark name ``"jsb"``, ``"nottingham"``,
        ``"musedata"`` or ``"piano-midi"`` (``<data_root>/polyphonic/*.mat``); or a path to a
        ``.mat``, a ``.json``/``.pkl``/``.pickle`` pitch-list file, or a folder of MIDI files.
    data_root : path, optional
        For benchmark names; default :func:`default_data_root`.
    **kwargs
        Passed to :func:`embedded_chorales` or :func:`load_midi_folder`.
    """
    key = str(spec).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key == "chorales":
        return embedded_chorales(**kwargs)
    if key in BENCHMARKS:
        root = Path(data_root) if data_root is not None else default_data_root()
        fname = BENCHMARKS[key][0]
        if root is None:
            raise DataError(
                f"dataset '{spec}' needs polyphonic/{fname}: set BBSERVICE_DATA to the data folder"
            )
        return load_mat(root / "polyphonic" / fname)
    p = Path(spec).expanduser()
    if p.is_dir():
        return load_midi_folder(p, **kwargs)
    if not p.exists():
        names = ", ".join(["chorales", *BENCHMARKS])
        raise DataError(f"music data '{spec}' is neither an existing path nor one of: {names}")
    suffix = p.suffix.lower()
    if suffix == ".mat":
        return load_mat(p)
    if suffix in (".json", ".pkl", ".pickle"):
        return load_pitch_lists(p)
    raise DataError(f"music data file '{p}' has an unknown suffix (want .mat, .json, .pkl)")
