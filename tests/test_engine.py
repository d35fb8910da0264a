"""The real engine on a tiny model that the tests build and load through the product's own code."""

import asyncio
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bot.core.types import Turn
from bot.engine import Engine, EngineClosed, EngineError, GenerationTimeout
from bot.engine.scheduler import Request
from tests.conftest import engine_config


def slow_steps(engine: Engine, seconds: float) -> None:
    """Make every decoding step take at least `seconds` (the hook runs on the engine thread)."""
    engine._model.get_decoder().layer_norm.register_forward_hook(lambda *a: time.sleep(seconds))


async def test_loads_local_dir_and_replies(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        reply = await engine.reply([Turn("user", "hello there")])
        assert isinstance(reply, str) and reply
        assert engine.device == "cpu" and engine.precision == "fp32"
        assert engine.max_input_tokens == 128


async def test_same_input_same_reply_and_input_matters(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        a = await engine.reply([Turn("user", "hello there")])
        assert await engine.reply([Turn("user", "hello there")]) == a
        others = {await engine.reply([Turn("user", t)]) for t in ("cats", "what do you like", "i have a dog")}
        assert others - {a}, "the tiny model's replies should depend on the input"


async def test_overlong_input_is_cut_not_an_error(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        history = [Turn("user", "word " * 300), Turn("bot", "ok " * 200), Turn("user", "music " * 1000)]
        assert len(engine.encode_prompt(history)) == 128
        assert isinstance(await engine.reply(history), str)


async def test_generation_runs_off_the_event_loop(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        threads: set[str] = set()
        engine._model.get_decoder().layer_norm.register_forward_hook(
            lambda *a: threads.add(threading.current_thread().name)
        )
        await engine.reply([Turn("user", "hi")])
        assert threads == {"engine"}


async def test_generation_overrides(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, num_beams=1, min_new_tokens=20, max_new_tokens=20)) as e:
        gen = e._generation_config
        assert (gen.num_beams, gen.min_new_tokens, gen.max_new_tokens) == (1, 20, 20)
        seen: list[list[int]] = []
        decode = e._scheduler.decode
        e._scheduler.decode = lambda ids: seen.append(ids) or decode(ids)
        await e.reply([Turn("user", "hi")])
        assert len(seen[0]) == 20 and e.stats().replies == 1


async def test_model_defaults_used_without_overrides(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        gen = engine._generation_config
        assert (gen.num_beams, gen.min_length, gen.max_length) == (2, 4, 12)  # tiny model's own config


async def test_reply_length_capped_by_positions(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, max_new_tokens=500)) as e:
        assert e._generation_config.max_new_tokens == 127


async def test_deadline_stops_generation(tiny_model_dir: Path) -> None:
    # A 3 s deadline leaves the unslowed reply below room to finish on a busy machine.
    async with Engine(engine_config(tiny_model_dir, generation_timeout_seconds=3.0)) as e:
        slow_steps(e, 1.0)  # 12 steps would take 12 s
        started = time.monotonic()
        with pytest.raises(GenerationTimeout):
            await e.reply([Turn("user", "hi")])
        assert time.monotonic() - started < 6.0
        e._model.get_decoder().layer_norm._forward_hooks.clear()
        assert await e.reply([Turn("user", "hi")])  # carries on afterwards


async def test_one_late_request_does_not_stop_the_others(tiny_model_dir: Path) -> None:
    """Deadlines are per request: the one past its deadline stops, the one beside it finishes."""
    async with Engine(engine_config(tiny_model_dir, num_beams=1, min_new_tokens=11, max_new_tokens=11)) as e:
        slow_steps(e, 0.05)  # 11 steps: about 0.55 s
        loop = asyncio.get_running_loop()
        outcomes: dict[str, asyncio.Future[Any]] = {name: loop.create_future() for name in ("late", "fine")}

        def deliver(name: str) -> Any:
            def settle(text: str | None, error: BaseException | None) -> None:
                loop.call_soon_threadsafe(outcomes[name].set_result, error or text)

            return settle

        ids = e.encode_prompt([Turn("user", "hello there")])
        now = time.monotonic()
        e._scheduler.submit(Request(ids, deliver("late"), deadline=now + 0.2))
        e._scheduler.submit(Request(ids, deliver("fine"), deadline=now + 60))
        late, fine = await asyncio.wait_for(asyncio.gather(outcomes["late"], outcomes["fine"]), 20)
        assert isinstance(late, GenerationTimeout)
        assert isinstance(fine, str) and fine


async def test_close_refuses_new_work_and_abandons_running(tiny_model_dir: Path) -> None:
    e = Engine(engine_config(tiny_model_dir))
    await e.start()
    slow_steps(e, 0.05)
    running = asyncio.create_task(e.reply([Turn("user", "hi")]))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(e.close(), timeout=2)
    with pytest.raises(EngineClosed):
        await running
    with pytest.raises(EngineClosed):
        await e.reply([Turn("user", "again")])


async def test_a_cancelled_request_leaves_the_batch(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, max_new_tokens=50, min_new_tokens=50)) as e:
        slow_steps(e, 0.02)
        task = asyncio.create_task(e.reply([Turn("user", "hi")]))
        await asyncio.sleep(0.2)
        assert e.stats().running == 1
        task.cancel()
        await asyncio.sleep(0.2)
        assert e.stats().running == 0
        assert await e.reply([Turn("user", "still here?")])


async def test_stats(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        await engine.reply([Turn("user", "hi")])
        s = engine.stats()
        assert s.replies == 1 and s.queue_depth == 0 and s.running == 0 and s.model.endswith("tiny-model0")
        assert s.latency_p50_s is not None and s.queue_wait_p50_s is not None
        assert s.tokens_per_second and s.uptime_s >= 0


async def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        await Engine(engine_config(tmp_path / "nope")).start()


async def test_int8_rejected_on_gpu_device() -> None:
    from bot.engine.device import resolve_precision

    with pytest.raises(EngineError, match="only on the CPU"):
        resolve_precision("int8", "cuda")
    assert resolve_precision("auto", "cpu") == "int8"


async def test_thread_survives_a_failing_step(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        runner = engine._scheduler.runner

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("step failed")

        monkeypatch.setattr(runner, "step", broken)
        with pytest.raises(EngineError, match="step failed"):
            await asyncio.wait_for(engine.reply([Turn("user", "hi")]), timeout=10)
        monkeypatch.undo()
        assert await asyncio.wait_for(engine.reply([Turn("user", "hi")]), timeout=10)


async def test_thread_survives_a_failing_decode(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:

        def broken(ids: list[int]) -> str:
            raise RuntimeError("decode failed")

        monkeypatch.setattr(engine._scheduler, "decode", broken)
        with pytest.raises(EngineError, match="decode failed"):
            await asyncio.wait_for(engine.reply([Turn("user", "hi")]), timeout=10)
        monkeypatch.undo()
        assert await asyncio.wait_for(engine.reply([Turn("user", "hi")]), timeout=10)


async def test_greedy_replies_stream_word_by_word(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, num_beams=1, min_new_tokens=11, max_new_tokens=11)) as e:
        assert e.can_stream
        partials: list[str] = []
        reply = await e.reply([Turn("user", "hello there")], partials.append)
        assert len(partials) >= 2, partials
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(partials))
        assert reply.startswith(partials[-1]) and reply == await e.reply([Turn("user", "hello there")])


async def test_beam_search_does_not_stream(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, num_beams=2)) as e:
        assert not e.can_stream
        partials: list[str] = []
        assert await e.reply([Turn("user", "hello there")], partials.append)
        assert partials == []
