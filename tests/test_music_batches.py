"""Training and evaluation batches of piano rolls: coverage, padding, masks."""

import numpy as np
import pytest
import torch

from training.music_batches import (
    collate,
    eval_batches,
    length_bucketed_batches,
    train_batches,
    usable,
)


def rolls(lengths):
    return [np.full((n, 88), i % 2, dtype=np.float32) for i, n in enumerate(lengths)]


def padded_steps(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("make", [train_batches, length_bucketed_batches])
def test_every_sequence_is_in_exactly_one_batch(make):
    lengths = np.random.default_rng(0).integers(2, 400, size=53)
    rng = np.random.default_rng(1)
    batches = make(len(lengths), 8, rng) if make is train_batches else make(lengths, 8, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(53))
    assert [len(b) for b in batches].count(8) == 6 and sorted(map(len, batches))[0] == 5


def test_length_buckets_pad_far_less_and_still_shuffle():
    lengths = np.random.default_rng(0).integers(2, 2000, size=400)
    rng = np.random.default_rng(1)
    random = train_batches(len(lengths), 8, rng)
    first = length_bucketed_batches(lengths, 8, rng)
    second = length_bucketed_batches(lengths, 8, rng)
    assert padded_steps(first, lengths) < 0.6 * padded_steps(random, lengths)
    assert padded_steps(first, lengths) < 1.05 * lengths.sum()
    assert [b.tolist() for b in first] != [b.tolist() for b in second]  # another order
    spans = [lengths[b].max() - lengths[b].min() for b in first]
    assert max(spans) < 100  # neighbours in length share a batch


def test_equal_lengths_get_new_batch_members_each_epoch():
    lengths = [50] * 32
    rng = np.random.default_rng(3)
    first = {frozenset(b.tolist()) for b in length_bucketed_batches(lengths, 8, rng)}
    second = {frozenset(b.tolist()) for b in length_bucketed_batches(lengths, 8, rng)}
    assert first != second


def test_collate_pads_and_masks_inputs_and_shifted_targets():
    seqs = rolls([4, 2])
    inputs, targets, lengths, mask = collate(seqs, torch.device("cpu"))
    assert inputs.shape == targets.shape == (2, 3, 88)
    assert lengths.tolist() == [3, 1]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(targets[0], torch.from_numpy(seqs[0][1:]))
    assert float(inputs[1, 2:].abs().sum()) == float(targets[1, 1:].abs().sum()) == 0.0  # padding


def test_eval_batches_group_by_length_and_usable_drops_single_frames():
    seqs = usable(rolls([5, 1, 9, 3, 7]))
    assert [len(s) for s in seqs] == [5, 9, 3, 7]
    batches = eval_batches(seqs, 2)
    assert [[len(seqs[i]) for i in b] for b in batches] == [[3, 5], [7, 9]]
