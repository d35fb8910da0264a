"""Chunked prefill: while replies are running, a new prompt is read in a few tokens per decoding step
(`prefill_chunk_tokens`), and its reply is still `generate()`'s token for token."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import Any

from bot.core.types import Turn
from bot.engine import Engine
from tests.engine_spies import record_tokens
from tests.test_engine_causal import HISTORIES, chat_config, generate_tokens

LONG = [Turn("user", "tell me something interesting about space and the stars " * 4, speaker="bob")]


def spy(engine: Engine) -> tuple[list[tuple[str, int]], threading.Event]:
    """Record the loop's steps ("step", rows) and chunks ("chunk", tokens left); slow steps to 20 ms.

    The event is set once the loop has run two steps.
    """
    runner = engine._scheduler.runner
    events: list[tuple[str, int]] = []
    step, prefill_some = runner.step, runner.prefill_some
    second = threading.Event()

    def slow_step(*args: Any) -> Any:
        events.append(("step", runner.blocks))
        if sum(kind == "step" for kind, _ in events) == 2:
            second.set()
        threading.Event().wait(0.02)
        return step(*args)

    def chunk(budget: int | None) -> int:
        left = prefill_some(budget)
        events.append(("chunk", left))
        return left

    runner.step, runner.prefill_some = slow_step, chunk
    return events, second


async def test_a_long_prompt_joins_in_chunks_between_steps(tiny_chat_model_dir: Path) -> None:
    """The first reply keeps stepping while the long prompt is read, finishes mid-join (the joining row
    moves down), and both replies equal generate()'s."""
    config = chat_config(tiny_chat_model_dir, prefill_chunk_tokens=4, min_new_tokens=8, max_new_tokens=8)
    async with Engine(config) as engine:
        expected = [generate_tokens(engine, h) for h in (HISTORIES[0], LONG)]
        prompt = len(engine.encode_prompt(LONG)) - 1
        engine._scheduler.runner.prefix_cache.clear()  # the long prompt is read from its first token
        seen = record_tokens(engine)
        events, second = spy(engine)
        first = asyncio.create_task(engine.reply(HISTORIES[0]))
        assert await asyncio.to_thread(second.wait, 10)
        await engine.reply(LONG)
        await first
        assert sorted(seen) == sorted(expected)
        chunks = [left for kind, left in events if kind == "chunk"][1:]  # the first: the first reply's, at once
        assert chunks[0] == prompt - 4 and chunks[-1] == 0, events
        # 4 tokens a step while the first reply runs; once it is done, the rest at once
        assert len(chunks) >= 4 and all(a - b == 4 for a, b in itertools.pairwise(chunks[:-1])), chunks
        begun, joined = events.index(("chunk", chunks[0])), events.index(("chunk", 0), 1)
        assert [e for e in events[begun:joined] if e[0] == "step"] == [("step", 1)] * (len(chunks) - 1), events
        assert ("step", 0) not in events


async def test_a_prompt_is_read_at_once_when_nothing_else_runs(tiny_chat_model_dir: Path) -> None:
    async with Engine(chat_config(tiny_chat_model_dir, prefill_chunk_tokens=4)) as engine:
        events, _ = spy(engine)
        await engine.reply(LONG)
        assert [e for e in events if e[0] == "chunk"] == [("chunk", 0)]  # add_block: the whole prompt at once


async def test_int8_batched_equals_alone_with_chunks(tiny_chat_model_dir: Path) -> None:
    async with Engine(chat_config(tiny_chat_model_dir, precision="int8", prefill_chunk_tokens=3)) as engine:
        alone = [await engine.reply(h) for h in [*HISTORIES, LONG]]
        engine._scheduler.runner.prefix_cache.clear()
        batched = await asyncio.gather(*(engine.reply(h) for h in [*HISTORIES, LONG]))
        assert list(batched) == alone and len(set(alone)) > 1


async def test_a_joining_request_past_its_deadline_fails_alone(tiny_chat_model_dir: Path) -> None:
    config = chat_config(tiny_chat_model_dir, prefill_chunk_tokens=1, min_new_tokens=16, max_new_tokens=16)
    async with Engine(config) as engine:
        _, second = spy(engine)
        first = asyncio.create_task(engine.reply(HISTORIES[0]))
        assert await asyncio.to_thread(second.wait, 10)
        scheduler = engine._scheduler
        deadline_passed = [False]
        original = scheduler._read_joining

        def late(*args: Any) -> None:
            original(*args)
            if scheduler._joining is not None and not deadline_passed[0]:
                scheduler._joining.deadline = 0.0  # the joining request runs out of time
                deadline_passed[0] = True

        scheduler._read_joining = late
        from bot.engine import GenerationTimeout

        try:
            await engine.reply(LONG)
        except GenerationTimeout:
            pass
        else:
            raise AssertionError("the joining request should have timed out")
        assert isinstance(await first, str)
        assert scheduler.runner.joining is None and scheduler._joining is None
        assert isinstance(await engine.reply(HISTORIES[1]), str)  # the loop goes on


async def test_short_prompts_share_one_steps_budget(tiny_chat_model_dir: Path) -> None:
    """Prompts that fit in what is left of a step's budget all join before that step."""
    config = chat_config(tiny_chat_model_dir, min_new_tokens=12, max_new_tokens=12)
    async with Engine(config) as engine:
        later = [HISTORIES[1], HISTORIES[2], HISTORIES[4]]
        scheduler = engine._scheduler
        scheduler.prefill_chunk_tokens = sum(len(engine.encode_prompt(h)) - 1 for h in later)
        scheduler.runner.prefix_cache.clear()
        expected = [generate_tokens(engine, h) for h in [HISTORIES[0], *later]]
        seen = record_tokens(engine)
        events, second = spy(engine)
        held, go = threading.Event(), threading.Event()
        spied = scheduler.runner.step

        def held_step(*args: Any) -> Any:
            if second.is_set() and not go.is_set():
                held.set()
                go.wait(10)
            return spied(*args)

        scheduler.runner.step = held_step
        first = asyncio.create_task(engine.reply(HISTORIES[0]))
        assert await asyncio.to_thread(held.wait, 10)  # the loop waits inside a step
        replies = [asyncio.create_task(engine.reply(h)) for h in later]
        for _ in range(500):
            if scheduler.waiting == len(later):
                break
            await asyncio.sleep(0.01)
        assert scheduler.waiting == len(later)
        go.set()
        await asyncio.gather(*replies, first)
        assert sorted(seen) == sorted(expected)
        steps = [rows for kind, rows in events if kind == "step"]
        assert 4 in steps and steps[steps.index(4) - 1] == 1, steps  # from one row to four in one step
