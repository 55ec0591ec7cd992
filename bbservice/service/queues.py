"""Bounded queues: the stochastic requests of one model kind run one at a time, and at most
``depth`` wait; one more is refused at once (429) instead of queueing without end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from bbservice.service.http import HTTPError


class BoundedQueue:
    """Run blocking calls in a worker thread, ``capacity`` at a time, with at most ``depth``
    callers waiting; a caller beyond that gets ``HTTPError(429)`` naming the queue.

    Each kind has its own queue, so the stochastic requests of one kind never wait behind
    those of the other, and mean-gate requests (which use other limiters) never wait here.
    """

    def __init__(self, name: str, depth: int, capacity: int = 1) -> None:
        self.name, self.depth = name, depth
        self.limiter = anyio.CapacityLimiter(capacity)
        self.waiting = 0
        self.refused = 0
        self.served = 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        busy = self.limiter.borrowed_tokens >= self.limiter.total_tokens
        if busy and self.waiting >= self.depth:
            self.refused += 1
            raise HTTPError(
                429,
                f"the {self.name} queue is full ({self.depth} waiting, "
                "BBSERVICE_STOCHASTIC_QUEUE); retry later",
            )
        self.waiting += 1
        started = False
        try:
            async with self.limiter:
                self.waiting -= 1
                started = True
                result = await anyio.to_thread.run_sync(fn, *args)
        finally:
            if not started:  # cancelled while waiting
                self.waiting -= 1
        self.served += 1
        return result

    def stats(self) -> dict[str, int]:
        return {
            "depth": self.depth,
            "waiting": self.waiting,
            "running": int(self.limiter.borrowed_tokens),
            "served": self.served,
            "refused": self.refused,
        }
