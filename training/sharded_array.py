"""A memory-mapped ``.npy`` array built once, split across the ranks of a process group, and
found again by its key.

Layout of one entry: ``root/<name>-<digest>/`` with ``array.npy`` (opened with
``numpy.load(mmap_mode="r")``: every process on a machine shares the same page cache, no rank
holds its own copy) and ``key.json`` (the key, the shape and the dtype), written last, so an
entry without ``key.json`` is an unfinished build and is rebuilt.

Building (:func:`build_or_open`): rank 0 allocates ``array.npy.partial`` (``open_memmap``),
every rank fills its contiguous share of the rows, rank 0 renames the file and writes
``key.json``; barriers in between when ``torch.distributed`` is initialised, a plain loop in a
single process. The folder must be on storage every rank sees (any local disk on one
machine; a shared file system across machines). One build per entry at a time: two jobs that
build the same entry at once overwrite each other's partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bbservice.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["Ranks", "build_or_open", "entry_folder", "key_digest", "shard"]

ARRAY, KEY = "array.npy", "key.json"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group (one process when none is up)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def shard(n: int, rank: int, world_size: int) -> range:
    """Rows of ``rank``'s contiguous share of ``n`` rows (sizes differ by at most one)."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def key_digest(key: dict[str, Any]) -> str:
    """sha256 (first 20 hex digits) of a key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def entry_folder(root: str | Path, name: str, key: dict[str, Any]) -> Path:
    return Path(root) / f"{name}-{key_digest(key)}"


def _open_existing(folder: Path, key: dict, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    meta_path, array_path = folder / KEY, folder / ARRAY
    if not meta_path.is_file() or not array_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    expected = {"key": key, "shape": list(shape), "dtype": np.dtype(dtype).str}
    if meta != expected:
        return None
    try:
        array = np.load(array_path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise DataError(f"{array_path}: unreadable cache entry ({err}); delete {folder}") from err
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise DataError(
            f"{array_path}: holds {array.shape} {array.dtype}, its key.json says "
            f"{tuple(shape)} {np.dtype(dtype)}; delete {folder}"
        )
    return array


def build_or_open(
    root: str | Path,
    name: str,
    key: dict[str, Any],
    shape: tuple[int, ...],
    dtype: np.dtype | str,
    fill: Callable[[range], Iterable[tuple[np.ndarray, np.ndarray]]],
    *,
    ranks: Ranks | None = None,
) -> tuple[np.ndarray, bool]:
    """The read-only memory map of the entry ``(name, key)``, built first if absent.

    Parameters
    ----------
    root : cache folder (created).
    name : a readable prefix of the entry's folder ("images", "features").
    key : JSON-serialisable dict; any change of it is another entry.
    shape, dtype : of the whole array (rows on axis 0).
    fill : ``fill(rows)`` yields ``(indices (n,), values (n, *shape[1:]))`` covering ``rows``,
        this rank's share; only called when the entry is built.
    ranks : the process group (default: :meth:`Ranks.current`).

    Returns
    -------
    (array, built): the memory map, and whether this call built it.
    """
    ranks = ranks or Ranks.current()
    folder = entry_folder(root, name, key)
    dtype = np.dtype(dtype)
    existing = _open_existing(folder, key, shape, dtype)
    ranks.barrier()  # nobody starts rebuilding while another rank is still checking
    if existing is not None:
        return existing, False
    partial = folder / (ARRAY + ".partial")
    if ranks.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / KEY).unlink(missing_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
    ranks.barrier()
    out = np.load(partial, mmap_mode="r+")
    rows = shard(shape[0], ranks.rank, ranks.world_size)
    filled = 0
    for index, values in fill(rows):
        index = np.asarray(index)
        if index.size and (index.min() < rows.start or index.max() >= rows.stop):
            raise ValueError(f"fill wrote rows outside its share {rows}")
        out[index] = values
        filled += index.size
    if filled != len(rows):
        raise ValueError(f"fill gave {filled} rows for a share of {len(rows)}")
    out.flush()
    del out
    ranks.barrier()
    if ranks.rank == 0:
        os.replace(partial, folder / ARRAY)
        meta = {"key": key, "shape": list(shape), "dtype": dtype.str}
        tmp = folder / (KEY + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, folder / KEY)
        log.info("built %s (%s %s)", folder, tuple(shape), dtype)
    ranks.barrier()
    return np.load(folder / ARRAY, mmap_mode="r"), True
