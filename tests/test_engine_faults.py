"""Faults inside the decode loop: each fails the requests it touches, the loop lives on; a loop that
dies anyway fails every waiter, refuses new work at once and says so to `/ready` and Ray Serve."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot import engine as engine_module
from bot.core.chat import ChatService
from bot.core.outcomes import ERROR_TEXT
from bot.core.types import Conversation, Turn
from bot.engine import Engine, EngineError, EngineSettingsError, GenerationTimeout
from bot.engine import scheduler as scheduler_module
from bot.history.sqlite import SQLiteHistoryStore
from bot.metrics import Metrics
from tests.conftest import engine_config

HELLO = [Turn("user", "hello there")]
OTHERS = [[Turn("user", "do you have any pets")], [Turn("user", "what do you like to do for fun")]]
ANSWER_WITHIN = 20.0  # seconds: far more than the tiny model needs, far less than "never"


class Once:
    """Wraps `real`: the first call raises (a fault injected at that point), the others pass through."""

    def __init__(self, real: Callable[..., Any], *, times: int = 1) -> None:
        self.real = real
        self.left = times
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise RuntimeError("injected fault")
        return self.real(*args, **kwargs)


async def answers(engine: Engine, prompts: list[list[Turn]]) -> list[str | BaseException]:
    """Every prompt's reply or error, all asked at once; fails the test if any of them hangs."""
    replies = asyncio.gather(*(engine.reply(p) for p in prompts), return_exceptions=True)
    return list(await asyncio.wait_for(replies, ANSWER_WITHIN))


async def assert_lives_on(engine: Engine) -> None:
    """The loop still answers, and reports nothing wrong."""
    reply = await asyncio.wait_for(engine.reply(HELLO), ANSWER_WITHIN)
    assert reply.strip()
    assert engine.failure() is None


@pytest.fixture
async def beam_engine(tiny_model_dir: Path) -> Any:
    """The tiny BlenderBot with 2 beams: beams reorder rows, so every point of the loop runs."""
    async with Engine(engine_config(tiny_model_dir, num_beams=2, max_batch=4)) as running:
        yield running


@pytest.mark.parametrize("point", ["logits_processors", "new_search"])
async def test_a_fault_while_admitting_fails_that_request_alone(
    beam_engine: Engine, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    fault = Once(getattr(scheduler_module, point))
    monkeypatch.setattr(scheduler_module, point, fault)
    first = await answers(beam_engine, [HELLO])
    assert isinstance(first[0], EngineError)
    rest = await answers(beam_engine, OTHERS)
    assert all(isinstance(r, str) and r for r in rest), rest
    assert beam_engine._scheduler.runner.blocks == 0  # the failed request's block went with it
    await assert_lives_on(beam_engine)


@pytest.mark.parametrize("method", ["reorder_rows", "remove_block", "reset_after_step"])
async def test_a_fault_in_the_batch_fails_its_requests_and_the_loop_goes_on(
    beam_engine: Engine, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    runner = beam_engine._scheduler.runner
    if method == "reset_after_step":  # a step that fails, whose recovery is then the ordinary one
        fault = Once(runner.step)
        monkeypatch.setattr(runner, "step", fault)
    else:
        fault = Once(getattr(runner, method))
        monkeypatch.setattr(runner, method, fault)
    results = await answers(beam_engine, [HELLO, *OTHERS])
    assert fault.calls >= 1
    # every request is answered or told: the ones the fault caught fail, any finished before it keep their reply
    assert all(isinstance(r, str | EngineError) for r in results), results
    if method != "remove_block":  # a removal fails after its own reply is out, possibly the batch's last
        assert any(isinstance(r, EngineError) for r in results), results
    await assert_lives_on(beam_engine)
    assert runner.blocks == 0


async def test_a_fault_while_expiring_fails_the_batch_and_the_loop_goes_on(
    beam_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = beam_engine._scheduler
    fault = Once(scheduler._expire)
    monkeypatch.setattr(scheduler, "_expire", fault)
    results = await answers(beam_engine, [HELLO])
    assert isinstance(results[0], EngineError)
    await assert_lives_on(beam_engine)


async def test_a_loop_that_cannot_recover_fails_every_waiter_and_refuses_new_work(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with Engine(engine_config(tiny_model_dir, num_beams=2, max_batch=1, max_queue=8)) as engine:
        scheduler, runner = engine._scheduler, engine._scheduler.runner
        monkeypatch.setattr(scheduler, "_expire", Once(scheduler._expire))
        monkeypatch.setattr(runner, "reset", Once(runner.reset))  # recovering fails too: the loop dies
        # one request runs (max_batch=1), two wait in the queue: all three are told
        results = await answers(engine, [HELLO, *OTHERS])
        assert all(isinstance(r, EngineError) for r in results), results
        engine._thread.join(timeout=5)  # it told everyone on its way out
        assert not engine._thread.is_alive()
        reason = engine.failure()
        assert reason is not None and "restart the bot" in reason
        started = time.monotonic()
        with pytest.raises(EngineError, match="stopped working"):
            await engine.reply(HELLO)  # refused at once, not queued for a loop that is gone
        assert time.monotonic() - started < 1
        died = [r for r in caplog.records if "decode loop stopped" in r.getMessage()]
        assert len(died) == 1

        # the bot's side: a notice for the next message, and /ready says why
        chat = ChatService(engine, await SQLiteHistoryStore.open(":memory:", 20))
        reply = await chat.respond(Conversation(1, None), 7, "are you there?")
        assert (reply.text, reply.ok) == (ERROR_TEXT, False)
        metrics = Metrics()
        metrics.add_readiness_check(engine.failure)
        assert metrics.readiness() == [reason]


async def test_a_decode_loop_that_hangs_is_bounded_and_reported(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "STUCK_GRACE_SECONDS", 0.5)
    async with Engine(engine_config(tiny_model_dir, generation_timeout_seconds=0.5)) as engine:
        runner = engine._scheduler.runner
        real_step, release = runner.step, asyncio.Event()
        loop = asyncio.get_running_loop()

        def hanging_step(*args: Any) -> Any:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()  # until the test lets go
            return real_step(*args)

        monkeypatch.setattr(runner, "step", hanging_step)
        started = time.monotonic()
        try:
            with pytest.raises(GenerationTimeout):
                await engine.reply(HELLO)
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.3)  # the loop went round just after the request came: now it is past due
            reason = engine.failure()
            assert reason is not None and "has not moved" in reason
            with pytest.raises(EngineError, match="has not moved"):
                await engine.reply(HELLO)  # refused at once while the loop is stuck
        finally:
            monkeypatch.setattr(runner, "step", real_step)
            release.set()
        for _ in range(100):  # the step ends, the loop goes round again
            if engine.failure() is None:
                break
            await asyncio.sleep(0.05)
        await assert_lives_on(engine)


def test_serve_health_check_fails_once_the_engine_cannot_answer() -> None:
    from bot.serve import ChatEngine

    class Stub:
        closed = False

        def __init__(self, failure: str | None) -> None:
            self._failure = failure

        def failure(self) -> str | None:
            return self._failure

    replica = ChatEngine.func_or_class.__new__(ChatEngine.func_or_class)
    replica.engine = Stub(None)
    asyncio.run(replica.check_health())
    replica.engine = Stub("the model stopped working")
    with pytest.raises(RuntimeError, match="stopped working"):
        asyncio.run(replica.check_health())


async def test_a_system_prompt_that_leaves_no_room_stops_the_start_in_one_line(tiny_chat_model_dir: Path) -> None:
    prompt = "You are a helpful assistant who always answers kindly. " * 40
    engine = Engine(engine_config(tiny_chat_model_dir, system_prompt=prompt, context_tokens=128))
    with pytest.raises(EngineSettingsError) as raised:
        await engine.start()
    message = str(raised.value)
    assert "\n" not in message
    assert "SYSTEM_PROMPT" in message and "CONTEXT_TOKENS" in message
    await engine.close()


async def test_a_system_prompt_that_fits_starts(tiny_chat_model_dir: Path) -> None:
    engine = Engine(engine_config(tiny_chat_model_dir, system_prompt="Be kind.", context_tokens=128))
    async with engine:
        assert (await engine.reply(HELLO)) is not None
