"""The vocabulary and its special ids (bbservice.vocab)."""

from __future__ import annotations

import pytest

from bbservice.errors import DataError
from bbservice.vocab import (
    END_ID,
    SPECIAL_IDS,
    SPECIALS,
    START_ID,
    UNK_ID,
    Vocabulary,
    placeholder_words,
)


def test_special_ids_are_the_vocabulary_positions():
    vocab = Vocabulary(["a", "b"])
    assert [vocab.itos[i] for i in SPECIAL_IDS.values()] == list(SPECIALS)
    assert (vocab.start_id, vocab.end_id, vocab.unk_id) == (START_ID, END_ID, UNK_ID)


def test_encode_decode_and_words():
    vocab = Vocabulary.build([["a", "b", "a"], ["c"]], min_count=1)
    assert vocab.itos[4:] == ["a", "b", "c"]
    ids = vocab.encode(["a", "zebra"])
    assert ids == [START_ID, 4, UNK_ID, END_ID]
    assert vocab.decode(ids) == ["a", "<unk>"]
    assert vocab.words([4, 99, END_ID]) == ["a", "<unk>", "<end>"]  # as they stand


def test_from_itos_and_placeholders():
    itos = placeholder_words(7)
    assert itos == ["<pad>", "<start>", "<end>", "<unk>", "w4", "w5", "w6"]
    assert Vocabulary.from_itos(itos).itos == itos
    with pytest.raises(DataError, match="first four words"):
        Vocabulary.from_itos(["a", "b", "c", "d"])


def test_json_round_trip_and_errors(tmp_path):
    vocab = Vocabulary(["x", "y"])
    vocab.to_json(tmp_path / "vocab.json")
    assert Vocabulary.from_json(tmp_path / "vocab.json") == vocab
    (tmp_path / "bad.json").write_text('{"words": []}')
    with pytest.raises(DataError, match="expected"):
        Vocabulary.from_json(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        Vocabulary.from_json(tmp_path / "missing.json")
