"""End to end with a decoder-only chat model: a tiny random Qwen2 with a ChatML template, through the fake Discord.

Greedy decoding (SAMPLING off), so a reply can be compared with the engine's answer to the same history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.core.types import Conversation, Turn
from tests.fake_discord import BotFactory, BotHarness

SYSTEM = "You are the test bot of this server."


def conversation(channel: Any) -> Conversation:
    return Conversation(channel.id, channel.guild_id)


@pytest.fixture
async def harness(bot_factory: BotFactory, tiny_chat_model_dir: Path) -> BotHarness:
    return await bot_factory(model_dir=tiny_chat_model_dir, sampling=False, system_prompt=SYSTEM)


def record_prompts(harness: BotHarness) -> list[str]:
    """The text of every prompt the engine builds, special tokens included."""
    engine = harness.engine
    prompts: list[str] = []
    encode = engine.encode_prompt

    def recording(history: Any, **options: Any) -> list[int]:
        ids = encode(history, **options)
        prompts.append(engine._tokenizer.decode(ids))
        return ids

    engine.encode_prompt = recording  # type: ignore[method-assign]
    return prompts


async def test_mention_dm_and_thread_each_keep_their_own_history(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    said = [(w.general, "hello there"), (w.dm_with(w.carol), "do you have any pets"), (w.thread, "music")]
    replies = [
        await fake.ask(w.carol if channel.guild_id is None else w.member, channel, text) for channel, text in said
    ]
    assert all(replies)
    for (channel, text), reply in zip(said, replies, strict=True):
        speaker = None if channel.guild_id is None else "Bob"
        assert await harness.history.get(conversation(channel)) == [
            Turn("user", text, speaker=speaker),
            Turn("bot", reply),
        ]
    assert replies[0] == await harness.engine.reply([Turn("user", "hello there", speaker="Bob")])


async def test_the_prompt_carries_the_system_prompt_and_who_said_what(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    prompts = record_prompts(harness)
    await fake.ask(w.member, w.general, "hello there")
    await fake.ask(w.carol, w.general, "what do you like to do for fun")
    await fake.ask(w.carol, w.dm_with(w.carol), "do you have any pets")
    in_server, second, in_dm = prompts
    assert in_server.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nBob: hello there<|im_end|>")
    assert "Bob: hello there" in second and "Carol: what do you like to do for fun" in second
    assert "<|im_start|>assistant\n" in second.removesuffix("<|im_start|>assistant\n")  # the first reply
    assert f"{SYSTEM}<|im_end|>\n<|im_start|>user\ndo you have any pets<|im_end|>" in in_dm  # no name in a DM


async def test_reset_forgets_the_conversation(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    prompts = record_prompts(harness)
    await fake.ask(w.member, w.general, "hello there")
    interaction = await fake.slash(w.admin, w.general, "reset")
    await fake.wait_response(interaction)
    assert await harness.history.get(conversation(w.general)) == []
    await fake.ask(w.member, w.general, "music")
    assert "hello there" not in prompts[-1] and "Bob: music" in prompts[-1]


async def test_a_long_conversation_is_cut_to_fit_the_context(
    bot_factory: BotFactory, tiny_chat_model_dir: Path
) -> None:
    harness = await bot_factory(
        model_dir=tiny_chat_model_dir, sampling=False, context_tokens=256, max_new_tokens=16, history_turns=40
    )
    fake, w = harness.fake, harness.fake.world
    engine = harness.engine
    sizes: list[int] = []
    encode = engine.encode_prompt
    engine.encode_prompt = lambda history, **options: sizes.append(len(ids := encode(history, **options))) or ids  # type: ignore[method-assign]
    for i in range(8):
        await fake.ask(w.member, w.general, f"message number {i} " + "tell me about the stars and music " * 4)
    assert engine.max_input_tokens == 256 - 16
    assert max(sizes) <= engine.max_input_tokens and sizes[-1] > 150  # full, and cut to fit
    assert len(await harness.history.get(conversation(w.general))) == 16  # all of it stored, only the newest sent


async def test_think_blocks_are_never_posted(harness: BotHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, w = harness.fake, harness.fake.world
    tokenizer = harness.engine._tokenizer
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: "<think>\nthe user greets me</think>\n\nHello!")
    assert await fake.ask(w.member, w.general, "hello there") == "Hello!"
    assert (await harness.history.get(conversation(w.general)))[-1] == Turn("bot", "Hello!")
