"""Micro-batching: requests that arrive within a few milliseconds of each other share one forward pass.

A request `submit`s one job and awaits its result. One worker task takes the first waiting job,
waits up to `max_wait_ms` for more (or until `max_batch` are waiting), and runs the whole batch
in the model's own thread, so the event loop keeps accepting requests meanwhile. While a batch
runs, new jobs queue up and form the next batch at once: under load the batches fill by
themselves and the wait costs nothing. `max_batch=1` turns batching off (one job per pass).
At most `queue_size` jobs wait; `submit` refuses more with `QueueFull` (the service's 503).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass
class BatchConfig:
    """How the service groups requests (`vlclassify serve --max-batch/--max-wait-ms/--queue-size`)."""

    max_batch: int = 32  # most jobs in one forward pass (1 = no micro-batching)
    max_wait_ms: float = 5.0  # how long a batch's first job waits for company
    queue_size: int = 128  # jobs waiting at most; more are refused (503)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_size < 1 or self.max_wait_ms < 0:
            raise ConfigError(
                f"batching: max_batch ({self.max_batch}) and queue_size ({self.queue_size}) must be >= 1, "
                f"max_wait_ms ({self.max_wait_ms}) >= 0"
            )


class QueueFull(Exception):
    """The batcher already holds `queue_size` waiting jobs."""


class MicroBatcher:
    """Gathers jobs into batches for `run(jobs) -> results` (one result per job, in order).

    `on_batch(size)` and `on_depth(waiting)` report to the metrics; `executor` is the one thread
    that runs the model (also used for other model calls, so they never overlap a batch)."""

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        config: BatchConfig,
        on_batch: Callable[[int], None] = lambda n: None,
        on_depth: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.run, self.config = run, config
        self.on_batch, self.on_depth = on_batch, on_depth
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlclassify-model")
        self._pending: deque[tuple[Any, asyncio.Future[Any]]] = deque()  # (job, its caller's future)
        self._wake: asyncio.Event | None = None  # set when a job arrives (created in the serving loop)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker task in the running event loop (the app's startup)."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._worker(), name="vlclassify-batcher")

    async def stop(self) -> None:
        """Stop the worker, cancel the jobs still waiting and shut the model thread down."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for _, fut in self._pending:
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        self.executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch (the queue-depth gauge)."""
        return len(self._pending)

    async def submit(self, job: Any) -> Any:
        """The job's result, computed in some batch; QueueFull when too many jobs wait."""
        if self._wake is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        if len(self._pending) >= self.config.queue_size:
            raise QueueFull(f"{len(self._pending)} requests are waiting (the queue holds {self.config.queue_size})")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        self.on_depth(len(self._pending))
        self._wake.set()
        return await fut  # a caller's timeout cancels fut; the worker then skips the job

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the model thread, between batches (e.g. an attention map)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _gather(self) -> list[tuple[Any, asyncio.Future[Any]]]:
        """Wait for a first job, then up to max_wait_ms for max_batch of them; pop the batch."""
        c, wake = self.config, self._wake
        assert wake is not None, "the worker runs only after start()"
        while not self._pending:
            wake.clear()
            await wake.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + c.max_wait_ms / 1000.0
        while len(self._pending) < c.max_batch and (left := deadline - loop.time()) > 0:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), left)
            except TimeoutError:
                break
        batch = [self._pending.popleft() for _ in range(min(c.max_batch, len(self._pending)))]
        self.on_depth(len(self._pending))
        return [(job, fut) for job, fut in batch if not fut.done()]  # timed-out callers are skipped

    async def _worker(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self.on_batch(len(batch))
            try:
                results = await self.call(self.run, [job for job, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
