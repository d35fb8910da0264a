"""The engine on a decoder-only chat model: a tiny random Qwen2 with a ChatML template, built at test time.

As for BlenderBot, `model.generate()` is the reference: greedy replies must match it token for
token, alone, batched, or joining while others are mid-reply.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.core.types import Turn
from bot.engine import Engine, EngineClosed, EngineConfig
from tests.engine_spies import join_mid_reply, record_tokens

HISTORIES = [
    [Turn("user", "hello there")],
    [Turn("user", "do you have any pets", speaker="alice")],
    [Turn("user", "hi"), Turn("bot", "hello there how are you today"), Turn("user", "i am fine thank you")],
    [Turn("user", "tell me something interesting about space and the stars " * 3, speaker="bob")],
    [Turn("user", "music")],
]


def chat_config(model_dir: Path, **overrides: Any) -> EngineConfig:
    """fp32 and greedy, so replies are exactly reproducible."""
    values: dict[str, Any] = {
        "model_name": str(model_dir),
        "device": "cpu",
        "precision": "fp32",
        "sampling": False,
        "system_prompt": "You are a friendly bot.",
    }
    return EngineConfig(**(values | overrides))


def generate_tokens(engine: Engine, history: list[Turn]) -> list[int]:
    prompt = engine.encode_prompt(history)
    with torch.inference_mode():
        out = engine._model.generate(input_ids=torch.tensor([prompt]), generation_config=engine._generation_config)
    return out[0, len(prompt) :].tolist()


async def test_greedy_replies_equal_generate_alone_and_batched(tiny_chat_model_dir: Path) -> None:
    async with Engine(chat_config(tiny_chat_model_dir)) as engine:
        assert engine.can_stream and engine._generation_config.repetition_penalty == 1.1  # the model's own
        expected = [generate_tokens(engine, h) for h in HISTORIES]
        assert len({tuple(e) for e in expected}) > 1
        seen = record_tokens(engine)
        for history in HISTORIES:
            await engine.reply(history)
        assert seen == expected
        seen.clear()
        batched = await asyncio.gather(*(engine.reply(h) for h in HISTORIES))
        assert sorted(seen) == sorted(expected)
        assert list(batched) == [await engine.reply(h) for h in HISTORIES]


async def test_a_request_joining_mid_reply_gets_the_same_reply(tiny_chat_model_dir: Path) -> None:
    async with Engine(chat_config(tiny_chat_model_dir, min_new_tokens=12, max_new_tokens=12)) as engine:
        expected = [generate_tokens(engine, h) for h in HISTORIES[:3]]
        seen = record_tokens(engine)
        blocks = await join_mid_reply(engine, HISTORIES[0], HISTORIES[1:3])
        assert blocks[:3] == [1, 1, 1] and max(blocks) >= 2, blocks
        assert sorted(seen) == sorted(expected)


async def test_int8_keeps_one_copy_of_the_tied_embedding_and_batching_changes_nothing(
    tiny_chat_model_dir: Path,
) -> None:
    from bot.engine.int8 import Int8Embedding, RowwiseInt8Linear

    async with Engine(chat_config(tiny_chat_model_dir, precision="int8")) as engine:
        model = engine._model
        assert isinstance(model.get_input_embeddings(), Int8Embedding)
        assert isinstance(model.lm_head, RowwiseInt8Linear)
        vocab = model.config.vocab_size
        assert not [name for name, p in model.named_parameters() if p.shape[0] == vocab], "an fp32 vocab matrix is left"
        alone = [await engine.reply(h) for h in HISTORIES]
        batched = await asyncio.gather(*(engine.reply(h) for h in HISTORIES))
        assert list(batched) == alone and len(set(alone)) > 1


async def test_sampling_follows_the_models_config_and_still_streams(tiny_chat_model_dir: Path) -> None:
    async with Engine(chat_config(tiny_chat_model_dir, sampling=True)) as engine:
        assert engine._generation_config.do_sample and engine._scheduler.plan.sample
        partials: list[str] = []
        replies = {await engine.reply(HISTORIES[0], partials.append) for _ in range(6)}
        assert len(replies) > 1, "sampled replies should differ"
        assert partials


async def test_the_prompt_fits_the_context_and_the_reply_its_room(tiny_chat_model_dir: Path) -> None:
    async with Engine(chat_config(tiny_chat_model_dir, context_tokens=256, max_new_tokens=40)) as engine:
        assert engine.max_input_tokens == 256 - 40
        long = [Turn("user" if i % 2 == 0 else "bot", f"message {i} " + "words " * 30) for i in range(41)]
        assert len(engine.encode_prompt(long)) <= engine.max_input_tokens
        assert isinstance(await engine.reply(long), str)


async def test_a_persona_that_leaves_no_room_is_refused_with_the_numbers(tiny_chat_model_dir: Path) -> None:
    engine = Engine(chat_config(tiny_chat_model_dir, context_tokens=256, max_new_tokens=40))
    async with engine:
        assert await engine.check_system_prompt("You are a pirate.") is None
        problem = await engine.check_system_prompt("You are a pirate who talks a lot. " * 40)
        assert problem is not None and "of the 216 tokens a prompt may hold" in problem
    with pytest.raises(EngineClosed):
        await engine.check_system_prompt("You are a pirate.")


async def test_think_blocks_are_never_shown(tiny_chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Engine(chat_config(tiny_chat_model_dir)) as engine:
        monkeypatch.setattr(engine._tokenizer, "decode", lambda ids, **kw: "<think>\nlet me think</think>\n\nHi there!")
        partials: list[str] = []
        assert await engine.reply(HISTORIES[0], partials.append) == "Hi there!"
        assert all("think" not in p for p in partials)
