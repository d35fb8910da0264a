"""Messages that arrive over time: evenly spaced, or as a Poisson process (open loop).

In an open loop the senders do not wait for answers, as on Discord: a slow bot builds a backlog
instead of slowing its users down. Each run reports per-message latency (send to answer), throughput
and, sampled every 100 ms, how many requests the server had running.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.workload import conversations, percentile
from bot.core.types import Turn

Reply = Callable[[list[Turn]], Awaitable[str]]


def poisson_offsets(rate: float, duration: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of `rate` messages per second."""
    rng = random.Random(seed)
    offsets, t = [], rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def send_over_time(
    reply: Reply,
    offsets: list[float],
    *,
    running: Callable[[], int] | None = None,
    drain_s: float = 60.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Send one new conversation at each offset; wait up to `drain_s` after the last send for answers."""
    histories = conversations(len(offsets), seed=seed)
    latencies: list[float] = []
    answered_at: list[float] = []
    samples: list[tuple[float, int]] = []
    started = time.perf_counter()

    async def one(offset: float, history: list[Turn]) -> None:
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        sent = time.perf_counter()
        await reply(history)
        now = time.perf_counter()
        latencies.append(now - sent)
        answered_at.append(now - started)

    async def sample() -> None:
        while running is not None:
            samples.append((time.perf_counter() - started, running()))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    tasks = [asyncio.create_task(one(o, h)) for o, h in zip(offsets, histories, strict=True)]
    last_send = offsets[-1] if offsets else 0.0
    await asyncio.wait(tasks, timeout=max(0.0, started + last_send + drain_s - time.perf_counter()))
    for task in tasks:
        task.cancel()
    sampler.cancel()
    span = max(answered_at, default=0.0)
    return {
        "sent": len(offsets),
        "answered": len(latencies),
        "unanswered": len(offsets) - len(latencies),
        "all_answered_s": span if len(latencies) == len(offsets) else None,
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_p99_s": percentile(latencies, 0.99),
        "throughput_per_s": len(latencies) / span if span else None,
        "running_samples": samples,
    }


class ThreadedNaive:
    """The naive path behind a queue: one thread runs one blocking `generate()` after another."""

    def __init__(self, naive: Any, beams: int, tokens: int) -> None:
        self.naive, self.beams, self.tokens = naive, beams, tokens
        self.running = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    async def reply(self, history: list[Turn]) -> str:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._queue.put((history, loop, future))
        return await future

    def close(self) -> None:
        """Drop what still waits, then stop after the reply in progress."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            history, loop, future = item
            self.running = 1
            self.naive.reply(history, self.beams, self.tokens)
            self.running = 0
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(""))
