"""Server-side batching: requests that arrive together run as one pipeline batch, off the event loop.

A request first takes a slot (``Batcher.slot``; all taken -> ``QueueFullError``), which bounds
what the server holds at once to ``capacity`` requests (the running batch plus the queue). Its
decoded image then waits in the queue; the worker takes the oldest job, waits at most
``max_wait_s`` for more (up to ``batch_size``), groups the jobs by key (the same key, the same
pipeline settings) and runs each group as one call in a single worker thread. Each result goes
back to its request's future; a request that waits longer than its timeout gets
``ResultTimeoutError`` and its job leaves the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# A batch function: (key, items) -> one result per item, in order. It runs in the worker thread.
RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFullError(Exception):
    """Every slot is taken: the server holds as many requests as it may."""


class ResultTimeoutError(Exception):
    """A request's result was not ready within its timeout."""


class ShuttingDownError(Exception):
    """The server stopped before the request's batch ran."""


@dataclass(eq=False)  # jobs compare by identity (their items may be arrays)
class _Job:
    key: Hashable
    item: Any
    future: asyncio.Future


class Batcher:
    """Collects jobs into batches of at most ``batch_size`` and runs them with ``run`` in one thread.

    Args:
        run: the batch function (see ``RunBatch``); an exception it raises goes to every job of
            that batch.
        batch_size: most jobs per call of ``run``; 1 switches batching off.
        max_wait_s: longest the oldest job waits for others to fill its batch.
        capacity: most requests holding a slot at once.

    ``batch_sizes`` records the size of every batch run (the newest 10,000).
    """

    def __init__(self, run: RunBatch, batch_size: int, max_wait_s: float, capacity: int) -> None:
        self.run = run
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self._admitted = 0
        self._jobs: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        """Jobs in the queue, not yet taken into a batch."""
        return len(self._jobs)

    @property
    def admitted(self) -> int:
        """Requests holding a slot."""
        return self._admitted

    @property
    def running(self) -> bool:
        """Whether the worker is alive."""
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segscope-batch")
        self._worker = asyncio.create_task(self._work(), name="segscope-batcher")

    async def stop(self) -> None:
        """Stop the worker; jobs still queued fail with ``ShuttingDownError``."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._jobs:
            self._fail([self._jobs.popleft()], ShuttingDownError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of ``capacity`` slots for the duration of a request.

        Raises:
            QueueFullError: all slots are taken.
        """
        if self._admitted >= self.capacity:
            raise QueueFullError(
                f"the server is busy: {self._admitted} requests in progress, the most it holds "
                f"(batch size {self.batch_size} + queue {self.capacity - self.batch_size}); retry later"
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def in_worker(self, function: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        """``function(*args)`` in the worker thread, between batches (for work that must not overlap them).

        Raises:
            ResultTimeoutError: not done within ``timeout_s`` seconds (it may still run later).
        """
        if self._executor is None:
            raise ShuttingDownError("the batch worker is not running")
        future = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise ResultTimeoutError(
                f"the worker was busy for longer than the request timeout of {timeout_s:g} s; retry later"
            ) from None

    async def submit(self, key: Hashable, item: Any, timeout_s: float) -> Any:
        """Queue ``item`` for a batch of jobs with the same ``key``; its result, once run.

        Raises:
            ResultTimeoutError: no result within ``timeout_s`` seconds (the job is dropped).
            ShuttingDownError: the worker is not running.
            Exception: whatever ``run`` raised for the batch.
        """
        if not self.running or self._arrived is None:
            raise ShuttingDownError("the batch worker is not running")
        job = _Job(key, item, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._arrived.set()
        try:
            return await asyncio.wait_for(job.future, timeout_s)
        except asyncio.TimeoutError:
            if job in self._jobs:
                self._jobs.remove(job)
            raise ResultTimeoutError(
                f"no result within the request timeout of {timeout_s:g} s (the server is overloaded or the "
                "image is very large); retry later"
            ) from None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._arrived is not None
        while True:
            while not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait_s
            while len(self._jobs) < self.batch_size and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs = [self._jobs.popleft() for _ in range(min(self.batch_size, len(self._jobs)))]
            for key, group in _group([job for job in jobs if not job.future.done()]).items():
                await self._run_group(loop, key, group)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, key: Hashable, jobs: list[_Job]) -> None:
        self.batch_sizes.append(len(jobs))
        try:
            results = await loop.run_in_executor(self._executor, self.run, key, [job.item for job in jobs])
        except asyncio.CancelledError:
            self._fail(jobs, ShuttingDownError("the server is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - the batch's error belongs to its requests
            self._fail(jobs, error)
            return
        if len(results) != len(jobs):
            self._fail(jobs, RuntimeError(f"batch function returned {len(results)} results for {len(jobs)} items"))
            return
        for job, result in zip(jobs, results):
            if not job.future.done():
                job.future.set_result(result)

    @staticmethod
    def _fail(jobs: list[_Job], error: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)


def _group(jobs: list[_Job]) -> dict[Hashable, list[_Job]]:
    """Jobs by key, keys in order of their first job."""
    groups: dict[Hashable, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    return groups
