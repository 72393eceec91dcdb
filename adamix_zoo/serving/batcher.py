"""Dynamic batching: concurrent requests (any tasks) are gathered into one mixed-task forward pass.

One asyncio worker takes the first waiting request, then keeps collecting until the batch holds
``max_batch_size`` rows or ``max_wait_ms`` have passed, runs the batch in a thread (so the event
loop keeps accepting requests) and resolves each request's future with its own rows' answers.
A request is never split; a failing batch is retried request by request so that one bad request
cannot fail the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

RunBatch = Callable[[list[Any], list[Any]], list[Any]]  # (tasks per row, rows) -> answers per row


@dataclass
class _Request:
    tasks: list[Any]
    rows: list[Any]
    future: asyncio.Future


@dataclass
class BatchStats:
    """Counters of what the worker did (reported by the server's /v1/stats)."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    max_rows: int = 0

    def record(self, rows: int, requests: int) -> None:
        self.batches += 1
        self.rows += rows
        self.requests += requests
        self.max_rows = max(self.max_rows, rows)


class DynamicBatcher:
    """Collect requests into batches of at most ``max_batch_size`` rows, waiting at most ``max_wait_ms``.

    Args:
        run: the blocking batch function, e.g. ``ServingEngine.predict_encoded``.
        max_batch_size: rows per batch (a single larger request still runs, alone).
        max_wait_ms: how long the first request of a batch may wait for company.
    """

    def __init__(self, run: RunBatch, max_batch_size: int = 32, max_wait_ms: float = 5.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._pending: _Request | None = None  # taken from the queue but did not fit the last batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adamix-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._executor.shutdown(wait=True)

    async def submit(self, tasks: Sequence[Any], rows: Sequence[Any]) -> list[Any]:
        """Queue one request's rows (``tasks[i]`` for ``rows[i]``) and wait for their answers."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(list(tasks), list(rows), future))
        return await future

    async def _next_batch(self) -> list[_Request]:
        assert self._queue is not None
        first = self._pending or await self._queue.get()
        self._pending = None
        batch, size = [first], len(first.rows)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get_nowait()
                    if timeout <= 0
                    else await asyncio.wait_for(self._queue.get(), timeout)
                )
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if size + len(item.rows) > self.max_batch_size:
                self._pending = item
                break
            batch.append(item)
            size += len(item.rows)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [r for r in batch if not r.future.done()]  # a client may have gone away
            if not live:
                continue
            tasks = [t for r in live for t in r.tasks]
            rows = [x for r in live for x in r.rows]
            try:
                answers = await loop.run_in_executor(self._executor, self.run, tasks, rows)
            except Exception as err:  # noqa: BLE001 - isolate the failing request below
                await self._retry_alone(live, err)
                continue
            self.stats.record(len(rows), len(live))
            start = 0
            for request in live:
                _resolve(request.future, answers[start : start + len(request.rows)])
                start += len(request.rows)

    async def _retry_alone(self, batch: list[_Request], err: Exception) -> None:
        """Run each request of a failed batch by itself, so only the faulty ones fail."""
        if len(batch) == 1:
            _fail(batch[0].future, err)
            return
        loop = asyncio.get_running_loop()
        for request in batch:
            try:
                answers = await loop.run_in_executor(
                    self._executor, self.run, request.tasks, request.rows
                )
            except Exception as own:  # noqa: BLE001 - handed to that request's caller
                _fail(request.future, own)
                continue
            self.stats.record(len(request.rows), 1)
            _resolve(request.future, answers)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)
