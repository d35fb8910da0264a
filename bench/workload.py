"""Workloads: conversations, the product engine under concurrency, the naive baseline, loop lag."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench.threads import in_own_thread
from bot.core.types import Turn

WORDS = (  # noqa: SIM905 - a word list reads and edits better as one string
    "hello there how are you today i am fine thank you what do you like to do for fun read books play "
    "games with my friends the weather is nice and sunny so we went outside do you have any pets at "
    "home yes a dog and two cats tell me something about space stars music favourite thing world "
    "where live work"
).split()


def conversations(n: int, seed: int = 0) -> list[list[Turn]]:
    """`n` different histories of varied length (about 40 to 120 prompt tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for t in range(rng.randint(2, 6)):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 22)))
            turns.append(Turn("user" if t % 2 == 0 else "bot", text))
        if turns[-1].role != "user":
            turns.append(Turn("user", f"and what about number {i}?"))
        out.append(turns)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class LoopLag:
    """An asyncio task that sleeps `interval` repeatedly and records how late it wakes up."""

    interval: float = 0.010
    overshoots: list[float] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.overshoots.append(time.perf_counter() - t - self.interval)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def run_concurrent(engine: Any, histories: list[list[Turn]]) -> dict[str, Any]:
    """Submit every history at once to `engine.reply`; per-reply latency, makespan, loop lag."""
    latencies: list[float] = []

    async def one(h: list[Turn]) -> str:
        t = time.perf_counter()
        text = await engine.reply(h)
        latencies.append(time.perf_counter() - t)
        return text

    with LoopLag() as lag:
        started = time.perf_counter()
        replies = list(await asyncio.gather(*(one(h) for h in histories)))  # in submission order
        makespan = time.perf_counter() - started
    return {
        "n": len(histories),
        "makespan_s": makespan,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "loop_lag_p99_ms": (percentile(lag.overshoots, 0.99) or 0.0) * 1000,
        "loop_lag_max_ms": max(lag.overshoots, default=0.0) * 1000,
        "replies": replies,
    }


class NaiveModel:
    """The baseline: fp32, model defaults (10 beams), one request at a time, generate() waited for
    (on a thread that ends with it: see `bench.threads`)."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = in_own_thread(AutoModelForSeq2SeqLM.from_pretrained, model_dir, dtype=torch.float32).eval()
        self.max_input = int(self.model.config.max_position_embeddings)

    def reply(self, history: list[Turn], num_beams: int, new_tokens: int) -> float:
        import torch

        from bot.engine.prompt import format_turns

        ids = self.tok(format_turns(history), return_tensors="pt", truncation=True, max_length=self.max_input)

        def generate() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                self.model.generate(**ids, num_beams=num_beams, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
            return time.perf_counter() - started

        return in_own_thread(generate)


def median(values: list[float]) -> float:
    return statistics.median(values)
