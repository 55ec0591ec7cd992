"""Bounded queues: the stochastic requests of one model kind run one at a time, and at most
``depth`` wait; one more is refused at once (429) instead of queueing without end."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import Any

from bbservice.service.http import HTTPError


class BoundedQueue:
    """Run blocking calls in a worker thread, ``capacity`` at a time, with at most ``depth``
    callers waiting; a caller beyond that gets ``HTTPError(429)`` naming the queue.

    Each kind has its own queue, so the stochastic requests of one kind never wait behind
    those of the other, and mean-gate requests (which use other limiters) never wait here.
    A call keeps its place until its thread has finished, even when the request that made it
    was cancelled (timeout, client gone): a thread cannot be stopped, and the work it still
    does must count.
    """

    def __init__(
        self,
        name: str,
        depth: int,
        capacity: int = 1,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        """``on_depth(n)`` is told the number of waiting callers whenever it changes (a gauge)."""
        self.name, self.depth, self.capacity = name, depth, capacity
        self.on_depth = on_depth or (lambda n: None)
        self.running = 0
        self.waiting = 0
        self.refused = 0
        self.served = 0
        self._free: asyncio.Condition | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.running >= self.capacity and self.waiting >= self.depth:
            self.refused += 1
            raise HTTPError(
                429,
                f"the {self.name} queue is full ({self.depth} waiting, "
                "BBSERVICE_STOCHASTIC_QUEUE); retry later",
            )
        self._free = self._free or asyncio.Condition()
        self.waiting += 1
        self.on_depth(self.waiting)
        try:
            async with self._free:
                await self._free.wait_for(lambda: self.running < self.capacity)
                self.running += 1
        finally:
            self.waiting -= 1
            self.on_depth(self.waiting)
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        future = loop.run_in_executor(None, call)
        future.add_done_callback(self._done)
        result = await asyncio.shield(future)  # a cancelled caller leaves the work counted
        self.served += 1
        return result

    def _done(self, future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # retrieved here too: the caller may be gone
        self.running -= 1
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._free:
            self._free.notify_all()

    def stats(self) -> dict[str, int]:
        return {
            "depth": self.depth,
            "waiting": self.waiting,
            "running": self.running,
            "served": self.served,
            "refused": self.refused,
        }
