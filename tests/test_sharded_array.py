"""training.sharded_array: built once, found again by key, rebuilt when unfinished, and a
build split over two (thread-simulated) ranks equals a single-process build."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from training.sharded_array import KEY, Ranks, build_or_open, entry_folder, shard

KEY_A = {"what": "squares", "n": 7}


def squares(calls: list):
    def fill(rows):
        calls.append(rows)
        for start in range(rows.start, rows.stop, 2):  # batches of two rows
            idx = np.arange(start, min(start + 2, rows.stop))
            yield idx, np.stack([np.full(3, i * i, np.float32) for i in idx])

    return fill


def test_shards_cover_the_rows_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            rows = [i for r in range(world) for i in shard(n, r, world)]
            assert rows == list(range(n))
            sizes = [len(shard(n, r, world)) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1


def test_built_once_then_reused_and_keyed(tmp_path):
    calls: list = []
    a, built = build_or_open(tmp_path, "sq", KEY_A, (7, 3), np.float32, squares(calls))
    assert built and calls == [range(0, 7)]
    np.testing.assert_array_equal(a[:, 0], np.arange(7) ** 2)
    assert not a.flags.writeable  # read-only map
    again, built = build_or_open(tmp_path, "sq", KEY_A, (7, 3), np.float32, squares(calls))
    assert not built and len(calls) == 1
    np.testing.assert_array_equal(again, a)
    other, built = build_or_open(
        tmp_path, "sq", {**KEY_A, "n": 8}, (7, 3), np.float32, squares(calls)
    )
    assert built and len(calls) == 2
    assert entry_folder(tmp_path, "sq", KEY_A) != entry_folder(tmp_path, "sq", {**KEY_A, "n": 8})
    # An unfinished entry (no key.json) is built again.
    (entry_folder(tmp_path, "sq", KEY_A) / KEY).unlink()
    _, built = build_or_open(tmp_path, "sq", KEY_A, (7, 3), np.float32, squares(calls))
    assert built and len(calls) == 3


def test_fill_must_cover_exactly_its_share(tmp_path):
    def short(rows):
        yield np.arange(rows.start, rows.stop - 1), np.zeros((len(rows) - 1, 3))

    with pytest.raises(ValueError, match="gave 6 rows for a share of 7"):
        build_or_open(tmp_path, "sq", KEY_A, (7, 3), np.float32, short)

    def outside(rows):
        yield np.arange(rows.start, rows.stop + 1), np.zeros((len(rows) + 1, 3))

    with pytest.raises(ValueError, match="outside its share"):
        build_or_open(tmp_path, "sq", KEY_A, (7, 3), np.float32, outside)


class ThreadRanks(Ranks):
    """Two ranks as two threads, their barrier a threading.Barrier."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        super().__init__(rank, 2)
        object.__setattr__(self, "_barrier", barrier)

    def barrier(self) -> None:
        self._barrier.wait(timeout=30)


def test_two_rank_build_equals_one_process_build(tmp_path):
    single, _ = build_or_open(tmp_path / "one", "sq", KEY_A, (7, 3), np.float32, squares([]))
    barrier = threading.Barrier(2)
    calls: list = []
    results: dict[int, np.ndarray] = {}
    errors: list = []

    def rank(r: int) -> None:
        try:
            results[r], _ = build_or_open(
                tmp_path / "two", "sq", KEY_A, (7, 3), np.float32, squares(calls),
                ranks=ThreadRanks(r, barrier),
            )  # fmt: skip
        except Exception as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(calls, key=lambda r: r.start) == [range(0, 4), range(4, 7)]
    for r in (0, 1):
        np.testing.assert_array_equal(results[r], single)
