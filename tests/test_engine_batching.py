"""Batching, ordering and backpressure of the engine, on the tiny model built at test time."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.core.chat import ChatService
from bot.core.outcomes import BUSY_TEXT
from bot.core.types import Conversation, Turn
from bot.engine import Engine, EngineBusy
from bot.history.sqlite import SQLiteHistoryStore
from tests.conftest import engine_config

PROMPTS = [
    [Turn("user", "hello")],
    [Turn("user", "do you have any pets at home")],
    [Turn("user", "hi"), Turn("bot", "hello there how are you today"), Turn("user", "i am fine thank you")],
    [Turn("user", "tell me something interesting about space and the stars and music " * 3)],
    [Turn("user", "what do you like to do for fun")],
    [Turn("user", "yes i have a dog")],
]


def record_batches(engine: Engine) -> list[int]:
    """Wrap the decoding step to record how many requests every step runs."""
    sizes: list[int] = []
    runner = engine._scheduler.runner
    step = runner.step

    def recording(*args: Any) -> Any:
        sizes.append(runner.blocks)
        return step(*args)

    runner.step = recording
    return sizes


async def replies_alone_and_batched(
    model_dir: Path, precision: str, **overrides: Any
) -> tuple[list[str], list[str], list[int]]:
    config = engine_config(model_dir, precision=precision, max_batch=8, **overrides)
    async with Engine(config) as engine:
        alone = [await engine.reply(p) for p in PROMPTS]
        sizes = record_batches(engine)
        batched = await asyncio.gather(*(engine.reply(p) for p in PROMPTS))
    return alone, list(batched), sizes


@pytest.mark.parametrize("num_beams", [1, 2])
async def test_fp32_batched_replies_equal_unbatched(tiny_model_dir: Path, num_beams: int) -> None:
    alone, batched, sizes = await replies_alone_and_batched(tiny_model_dir, "fp32", num_beams=num_beams)
    assert max(sizes) > 1, f"the requests were not batched: {sizes}"
    assert len(set(alone)) > 1  # different prompts, different replies: the comparison means something
    assert batched == alone


async def test_int8_batched_replies_equal_unbatched(tiny_model_dir: Path) -> None:
    """Row-wise int8: other rows in the batch cannot change a reply (quantize_dynamic's could)."""
    alone, batched, sizes = await replies_alone_and_batched(tiny_model_dir, "int8")
    assert max(sizes) > 1
    assert batched == alone


def test_rowwise_int8_linear_is_batch_invariant_and_close() -> None:
    from bot.engine.int8 import RowwiseInt8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = RowwiseInt8Linear(linear.weight, linear.bias)
    x = torch.randn(40, 64) * torch.rand(40, 1) * 10  # rows of very different scales
    full = q(x)
    for start, size in ((0, 1), (3, 2), (5, 7), (10, 30)):
        assert torch.equal(q(x[start : start + size]), full[start : start + size])
    assert torch.equal(q(x.view(4, 10, 64)).view(40, 48), full)
    reference = linear(x)
    assert ((full - reference).norm() / reference.norm()).item() < 0.03
    assert torch.equal(q(torch.zeros(2, 64)), linear.bias.expand(2, 48))  # all-zero rows: no NaN


async def test_int8_model_swaps_every_linear(tiny_model_dir: Path) -> None:
    from bot.engine.int8 import RowwiseInt8Linear

    async with Engine(engine_config(tiny_model_dir, precision="int8")) as engine:
        assert engine.precision == "int8"
        modules = list(engine._model.modules())
        assert not any(type(m) is torch.nn.Linear for m in modules)
        assert any(isinstance(m, RowwiseInt8Linear) for m in modules)
        assert await engine.reply([Turn("user", "hello there")])


async def test_int8_falls_back_to_bf16_once(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.setattr("bot.engine.device._can_quantize", lambda: False)
    async with Engine(engine_config(tiny_model_dir, precision="int8")) as engine:
        assert engine.precision == "bf16"
        assert await engine.reply([Turn("user", "hello there")])
    assert sum("cannot quantize" in r.getMessage() for r in caplog.records) == 1


class RecordingEngine:
    """Passes through to a real engine and records the history each reply was asked for."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[list[Turn]] = []

    async def reply(self, history: list[Turn], on_partial: Any = None, **options: Any) -> str:
        self.seen.append(list(history))
        return await self.engine.reply(history, on_partial, **options)

    @property
    def can_stream(self) -> bool:
        return self.engine.can_stream

    def stats(self) -> Any:
        return self.engine.stats()


async def test_chat_service_keeps_order_within_a_conversation(tiny_model_dir: Path) -> None:
    async with Engine(engine_config(tiny_model_dir)) as engine:
        recording = RecordingEngine(engine)
        chat = ChatService(recording, SQLiteHistoryStore(":memory:", max_turns=50))
        here, other = Conversation(1), Conversation(2)
        said = ["first message", "second message", "third message"]
        results = await asyncio.gather(
            *(chat.respond(here, 7, text) for text in said), chat.respond(other, 8, "somewhere else")
        )
        assert all(r.ok for r in results)
        history = await chat.history.get(here)
        assert [t.text for t in history if t.role == "user"] == said
        assert [t.role for t in history] == ["user", "bot"] * 3
        # each step saw the previous replies: the second request's history holds the first answer
        mine = [h for h in recording.seen if h[-1].text in said]
        assert [len(h) for h in mine] == [1, 3, 5]
        assert (await chat.history.get(other))[0].text == "somewhere else"
        await chat.history.close()


async def test_full_queue_refuses_at_once_and_chat_says_busy(tiny_model_dir: Path) -> None:
    config = engine_config(tiny_model_dir, max_batch=1, max_queue=2)
    async with Engine(config) as engine:
        release = threading.Event()
        running = threading.Event()
        runner = engine._scheduler.runner
        step = runner.step

        def blocked(*args: Any) -> Any:
            running.set()
            release.wait(30)
            return step(*args)

        runner.step = blocked
        first = asyncio.create_task(engine.reply([Turn("user", "one")]))
        assert await asyncio.to_thread(running.wait, 10)  # the thread holds request one
        waiting = [asyncio.create_task(engine.reply([Turn("user", f"wait {i}")])) for i in range(2)]
        await asyncio.sleep(0.05)
        assert engine.stats().queue_depth == 2 and engine.stats().running == 1
        with pytest.raises(EngineBusy):
            await engine.reply([Turn("user", "one too many")])
        chat = ChatService(engine, SQLiteHistoryStore(":memory:", max_turns=10))
        busy = await chat.respond(Conversation(5), 1, "are you there?")
        assert busy.text == BUSY_TEXT and not busy.ok
        assert await chat.history.get(Conversation(5)) == []  # a refusal is not stored
        await chat.history.close()
        release.set()
        answers = await asyncio.gather(first, *waiting)
        assert all(isinstance(a, str) for a in answers)
        # the queue drained: work is accepted again
        assert isinstance(await engine.reply([Turn("user", "again")]), str)
