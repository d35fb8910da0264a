"""Spies on a running engine's decode loop, for tests that compare it with `generate()`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from bot.core.types import Turn
from bot.engine import Engine


def record_tokens(engine: Engine) -> list[list[int]]:
    """The token ids of every reply the engine decodes, in the order they finish."""
    seen: list[list[int]] = []
    scheduler = engine._scheduler
    decode = scheduler.decode

    def recording(ids: list[int]) -> str:
        seen.append(list(ids))
        return decode(ids)

    scheduler.decode = recording
    return seen


async def join_mid_reply(engine: Engine, first: Sequence[Turn], later: Sequence[Sequence[Turn]]) -> list[int]:
    """Send `first`, then, once it has run three decoding steps, every one of `later`; wait for all.

    Steps are slowed to 20 ms so the later requests arrive while the first is mid-reply. Returns how
    many requests each step ran.
    """
    runner = engine._scheduler.runner
    step = runner.step
    blocks: list[int] = []
    third = threading.Event()

    def slow_step(*args: Any) -> Any:
        blocks.append(runner.blocks)
        if len(blocks) == 3:
            third.set()
        threading.Event().wait(0.02)
        return step(*args)

    runner.step = slow_step
    running = asyncio.create_task(engine.reply(first))
    assert await asyncio.to_thread(third.wait, 10)
    await asyncio.gather(*(engine.reply(h) for h in later))
    await running
    return blocks
