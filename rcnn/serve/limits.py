"""Bounded work for the server: a fixed number of inferences at once, a bounded queue, a timeout.

Inference runs in a thread pool of ``concurrency`` threads, never on the event loop. A request
takes a ticket first: at most ``concurrency`` run and ``queue_size`` wait; a request beyond that
is refused at once (:class:`Busy`, answered 503 with ``Retry-After``) rather than piling up.
A request that waits and runs longer than ``timeout_s`` is answered 504 (:class:`TimedOut`); its
computation cannot be interrupted, so its thread finishes it and only then gives the ticket back,
which keeps the number of running inferences at ``concurrency`` whatever the timeouts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["ApiError", "Busy", "TimedOut", "WorkQueue"]

T = TypeVar("T")


class ApiError(Exception):
    """An error answered as JSON ``{"error": code, "detail": ...}`` with an HTTP status."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


class Busy(ApiError):
    def __init__(self, running: int, waiting: int, retry_after: int) -> None:
        super().__init__(
            503, "busy",
            f"the server is at its limit ({running} inferences running, {waiting} waiting); retry in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )  # fmt: skip


class TimedOut(ApiError):
    def __init__(self, seconds: float) -> None:
        super().__init__(504, "timeout", f"the inference did not finish within {seconds:g} s (request_timeout_s)")


class WorkQueue:
    """``concurrency`` worker threads, ``queue_size`` waiting places, ``timeout_s`` per request."""

    def __init__(self, concurrency: int = 1, queue_size: int = 8, timeout_s: float = 60.0, retry_after_s: int = 1) -> None:
        if concurrency < 1 or queue_size < 0 or not timeout_s > 0:
            raise ValueError(f"need concurrency >= 1, queue_size >= 0, timeout_s > 0; got {concurrency}, {queue_size}, {timeout_s}")
        self.concurrency, self.queue_size, self.timeout_s, self.retry_after_s = concurrency, queue_size, timeout_s, retry_after_s
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rcnn-infer")
        self._lock = threading.Lock()
        self._tickets = 0  # requests admitted and not yet finished (running + waiting)
        self._running = 0

    @property
    def load(self) -> dict[str, int]:
        """``{"running", "waiting", "concurrency", "queue_size"}`` now."""
        with self._lock:
            return {"running": self._running, "waiting": self._tickets - self._running,
                    "concurrency": self.concurrency, "queue_size": self.queue_size}  # fmt: skip

    def _admit(self) -> None:
        with self._lock:
            if self._tickets >= self.concurrency + self.queue_size:
                raise Busy(self._running, self._tickets - self._running, self.retry_after_s)
            self._tickets += 1

    def _job(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self._running += 1
        try:
            return fn()
        finally:
            with self._lock:
                self._running -= 1

    def _done(self, _: Future) -> None:
        with self._lock:
            self._tickets -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread; :class:`Busy` when full, :class:`TimedOut` after ``timeout_s``."""
        self._admit()
        try:
            future = self._pool.submit(self._job, fn)
        except BaseException:
            with self._lock:
                self._tickets -= 1
            raise
        future.add_done_callback(self._done)  # the ticket is returned when the work is really over
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # a request still waiting is dropped; a running one finishes in its thread
            raise TimedOut(self.timeout_s) from None

    def shutdown(self) -> None:
        """Stop the workers (waiting for the running inferences)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:  # pragma: no cover - for logs
        return f"WorkQueue({self.load})"
