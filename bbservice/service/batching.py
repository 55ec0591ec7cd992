"""Adaptive batching of caption requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import numpy as np


class CaptionBatcher:
    """Requests that arrive while a batch is running wait and form the next batch together.

    No added latency when idle: the first request runs at once (batch of one); while it runs,
    later requests with the same decoding parameters (``key``) queue and then run as one
    batched encoder call and one batched beam search (up to ``max_batch`` images). ``run(key,
    arrays)`` takes preprocessed images ``(3, S, S)`` and returns one result per image;
    ``on_queue(n)``, when given, hears the number of requests waiting whenever it changes.
    """

    def __init__(
        self,
        run: Callable[[tuple, list[np.ndarray]], list],
        max_batch: int,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        self.run, self.max_batch, self.on_queue = run, max_batch, on_queue
        self.pending: list[tuple[tuple, np.ndarray, asyncio.Future]] = []
        self.running = False
        self.limiter = anyio.CapacityLimiter(1)
        self.batches = 0
        self.images = 0

    async def submit(self, key: tuple, array: np.ndarray) -> tuple[Any, int]:
        """(the result for ``array``, the size of the batch it ran in)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((key, array, future))
        self._queue_changed()
        if not self.running:
            self.running = True
            loop.create_task(self._drain())
        return await future

    def _next_batch(self) -> tuple[tuple, list]:
        """Take the oldest request's key and up to ``max_batch`` pending requests with it."""
        key = self.pending[0][0]
        batch = [p for p in self.pending if p[0] == key][: self.max_batch]
        taken = {id(p) for p in batch}
        self.pending = [p for p in self.pending if id(p) not in taken]
        self._queue_changed()
        return key, [p for p in batch if not p[2].done()]  # timed-out requests drop out

    async def _drain(self) -> None:
        try:
            while self.pending:
                key, batch = self._next_batch()
                if not batch:
                    continue
                try:
                    results = await anyio.to_thread.run_sync(
                        self.run, key, [p[1] for p in batch], limiter=self.limiter
                    )
                except Exception as err:
                    for p in batch:
                        if not p[2].done():
                            p[2].set_exception(err)
                    continue
                self.batches += 1
                self.images += len(batch)
                for p, result in zip(batch, results, strict=True):
                    if not p[2].done():
                        p[2].set_result((result, len(batch)))
        finally:
            self.running = False

    def _queue_changed(self) -> None:
        if self.on_queue is not None:
            self.on_queue(len(self.pending))

    def stats(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "batches": self.batches,
            "images": self.images,
            "mean_batch_size": round(self.images / self.batches, 3) if self.batches else None,
        }
