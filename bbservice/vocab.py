"""The caption vocabulary and its special ids: the one home of the word <-> id map.

Ids 0-3 are the specials ``<pad>``, ``<start>``, ``<end>``, ``<unk>``; the words follow, most
frequent first. Training builds a :class:`Vocabulary` from captions and writes ``vocab.json``
(``{"itos": [...]}``, specials included) next to the checkpoint; the exporter copies it into
the export and its manifest (``special_ids``); the torch-free service decodes with it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from bbservice.errors import DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "start": START_ID, "end": END_ID, "unk": UNK_ID}
VOCAB_FILE = "vocab.json"


def placeholder_words(size: int) -> list[str]:
    """Specials and ``w4, w5, ...``: the vocabulary of a model built without data."""
    return [*SPECIALS, *(f"w{i}" for i in range(len(SPECIALS), size))]


class Vocabulary:
    """Word <-> id map with ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3."""

    PAD, START, END, UNK = PAD, START, END, UNK
    SPECIALS = SPECIALS
    pad_id, start_id, end_id, unk_id = PAD_ID, START_ID, END_ID, UNK_ID

    def __init__(self, words: Iterable[str]) -> None:
        words = [w for w in words if w not in self.SPECIALS]
        self.itos: list[str] = [*self.SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise DataError("vocabulary: duplicate words")

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for cap in captions for w in cap)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(kept)

    @classmethod
    def from_itos(cls, itos: Sequence[str], source: str = "vocabulary") -> Vocabulary:
        """The vocabulary of a full id -> word list (specials first, as in ``vocab.json``)."""
        if not all(isinstance(w, str) for w in itos):
            raise DataError(f"{source}: expected {{'itos': [list of words]}}")
        if tuple(itos[:4]) != cls.SPECIALS:
            raise DataError(f"{source}: the first four words must be {', '.join(cls.SPECIALS)}")
        return cls(itos[4:])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """``[<start>, ids of tokens[:max_len] (<unk> if unknown), <end>]``."""
        tokens = tokens if max_len is None else tokens[:max_len]
        return [self.start_id, *(self.stoi.get(t, self.unk_id) for t in tokens), self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<end>``; ``<start>`` and ``<pad>`` are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else self.UNK)
        return out

    def words(self, ids: Iterable[int]) -> list[str]:
        """The word of every id as it stands (an id out of range reads ``<unk>``)."""
        itos = self.itos
        return [itos[i] if 0 <= i < len(itos) else self.UNK for i in map(int, ids)]

    def to_json(self, path: str | Path) -> None:
        """Write ``{"itos": [...]}`` (specials included)."""
        Path(path).write_text(json.dumps({"itos": self.itos}, ensure_ascii=False, indent=0))

    @classmethod
    def from_json(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            data = json.loads(path.read_bytes())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from exc
        itos = data.get("itos") if isinstance(data, dict) else None
        if not isinstance(itos, list):
            raise DataError(f"{path}: expected {{'itos': [list of words]}}")
        return cls.from_itos(itos, str(path))
