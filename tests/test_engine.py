"""The real engine on a tiny model that the tests build and load through the product's own code."""

import asyncio
import threading
import time
from pathlib import Path

import pytest

from bot.engine import Engine, EngineClosed, EngineError, GenerationTimeout
from bot.types import Turn
from tests.conftest import engine_config


async def test_loads_local_dir_and_replies(engine: Engine) -> None:
    reply = await engine.reply([Turn("user", "hello there")])
    assert isinstance(reply, str) and reply
    assert engine.device == "cpu" and engine.precision == "fp32"
    assert engine.max_input_tokens == 128


async def test_same_input_same_reply_and_input_matters(engine: Engine) -> None:
    a = await engine.reply([Turn("user", "hello there")])
    assert await engine.reply([Turn("user", "hello there")]) == a
    others = {await engine.reply([Turn("user", t)]) for t in ("cats", "what do you like", "i have a dog")}
    assert others - {a}, "the tiny model's replies should depend on the input"


async def test_overlong_input_is_cut_not_an_error(engine: Engine) -> None:
    history = [Turn("user", "word " * 300), Turn("bot", "ok " * 200), Turn("user", "music " * 1000)]
    assert len(engine.encode_prompt(history)) == 128
    assert isinstance(await engine.reply(history), str)


async def test_generation_runs_off_the_event_loop(engine: Engine) -> None:
    threads: set[str] = set()
    engine._model.register_forward_hook(lambda *a: threads.add(threading.current_thread().name))
    await engine.reply([Turn("user", "hi")])
    assert threads == {"engine"}


async def test_generation_overrides(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, num_beams=1, min_new_tokens=20, max_new_tokens=20)) as e:
        gen = e._generation_config
        assert (gen.num_beams, gen.min_new_tokens, gen.max_new_tokens) == (1, 20, 20)
        await e.reply([Turn("user", "hi")])
        assert e.stats().replies == 1


async def test_model_defaults_used_without_overrides(engine: Engine) -> None:
    gen = engine._generation_config
    assert (gen.num_beams, gen.min_length, gen.max_length) == (2, 4, 12)  # tiny model's own config


async def test_reply_length_capped_by_positions(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, max_new_tokens=500)) as e:
        assert e._generation_config.max_new_tokens == 127


async def test_deadline_stops_generation(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir, generation_timeout_seconds=1.0)) as e:
        e._model.register_forward_hook(lambda *a: time.sleep(0.3))  # 12 steps would take 3.6 s
        started = time.monotonic()
        with pytest.raises(GenerationTimeout):
            await e.reply([Turn("user", "hi")])
        assert time.monotonic() - started < 3.0
        e._model._forward_hooks.clear()
        assert await e.reply([Turn("user", "hi")])  # carries on afterwards


async def test_close_refuses_new_work_and_abandons_running(tiny_model_dir: Path) -> None:
    e = Engine(engine_config(tiny_model_dir))
    await e.start()
    e._model.register_forward_hook(lambda *a: time.sleep(0.05))
    running = asyncio.create_task(e.reply([Turn("user", "hi")]))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(e.close(), timeout=2)
    with pytest.raises(EngineClosed):
        await running
    with pytest.raises(EngineClosed):
        await e.reply([Turn("user", "again")])


async def test_stats(engine: Engine) -> None:
    await engine.reply([Turn("user", "hi")])
    s = engine.stats()
    assert s.replies == 1 and s.queue_depth == 0 and s.model.endswith("tiny-model0")
    assert s.latency_p50_s is not None and s.tokens_per_second and s.uptime_s >= 0


async def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="could not load"):
        await Engine(engine_config(tmp_path / "nope")).start()


async def test_int8_rejected_on_gpu_device() -> None:
    from bot.engine import resolve_precision

    with pytest.raises(EngineError, match="only on the CPU"):
        resolve_precision("int8", "cuda")
    assert resolve_precision("auto", "cpu") == "int8"


async def test_beam_sharing_changes_no_reply(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.engine.beam_search
    from bot.engine.beam_search import BeamSharedProjection

    texts = ["hello", "hello there how are you", "cats", "i have a dog and two cats"]
    async with Engine(engine_config(tiny_model_dir, num_beams=4)) as shared:
        wrappers = [m for m in shared._model.modules() if isinstance(m, BeamSharedProjection)]
        assert len(wrappers) == 2 and all(w.group == 4 for w in wrappers)  # k and v of the one decoder layer
        together = await asyncio.gather(*(shared.reply([Turn("user", t)]) for t in texts))
        alone = [await shared.reply([Turn("user", t)]) for t in texts]
    monkeypatch.setattr(bot.engine.beam_search, "share_cross_attention_", lambda model: [])
    async with Engine(engine_config(tiny_model_dir, num_beams=4)) as plain:
        assert not any(isinstance(m, BeamSharedProjection) for m in plain._model.modules())
        reference = [await plain.reply([Turn("user", t)]) for t in texts]
    assert list(together) == alone == reference


async def test_thread_survives_a_failure_after_generate(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("decode failed")

    monkeypatch.setattr(engine._tokenizer, "batch_decode", broken)
    with pytest.raises(EngineError, match="decode failed"):
        await asyncio.wait_for(engine.reply([Turn("user", "hi")]), timeout=10)
    monkeypatch.undo()
    assert await asyncio.wait_for(engine.reply([Turn("user", "hi")]), timeout=10)
