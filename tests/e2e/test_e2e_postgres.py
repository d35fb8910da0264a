"""End to end with HISTORY_DB=postgresql://...: the real ChatBot keeps its history in PostgreSQL.

A second store on the same database stands for another bot process: what one writes, the other
reads; a reset in the other holds against a reply being generated here.
"""

from __future__ import annotations

import asyncio

from bot.core.types import Conversation, Turn
from bot.history import open_store
from tests.fake_discord import BotFactory
from tests.scripted_engine import ScriptedEngine


async def test_replies_resets_and_restarts_on_postgresql(bot_factory: BotFactory, postgres_url: str) -> None:
    first = await bot_factory(history_db=postgres_url)
    fake, w = first.fake, first.fake.world
    here = Conversation(w.general.id, w.guild_id)
    answer = await fake.ask(w.member, w.general, "hello there")
    other_process = await open_store(postgres_url, max_turns=first.settings.history_turns)
    try:
        assert await other_process.get(here) == [Turn("user", "hello there", "Bob"), Turn("bot", answer)]
        response = await fake.wait_response(await fake.slash(w.admin, w.general, "reset"))
        assert response["data"]["content"] == "Done: I've forgotten this conversation (2 messages)."
        assert await other_process.get(here) == []
        await fake.ask(w.member, w.general, "do you have any pets")
        await first.stop()
        second = await bot_factory(history_db=postgres_url)  # a restart keeps the history
        assert (await second.history.get(here))[0].text == "do you have any pets"
        await other_process.reset_guild(w.guild_id)
        assert await second.history.get(here) == []
    finally:
        await other_process.close()


async def test_a_reset_in_another_process_holds_during_a_reply(bot_factory: BotFactory, postgres_url: str) -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    harness = await bot_factory(history_db=postgres_url, engine=engine)
    fake, w = harness.fake, harness.fake.world
    asking = asyncio.create_task(fake.ask(w.member, w.general, "a secret"))
    async with asyncio.timeout(15):
        while not engine.seen:  # noqa: ASYNC110 - the engine has no event to wait on; the reply is being generated...
            await asyncio.sleep(0.01)
    other_process = await open_store(postgres_url, max_turns=10)
    try:
        await other_process.forget_user(w.member.id)  # ...when /forget-me runs in another process
        engine.gate.set()
        assert await asking == "re: a secret"  # Bob still gets his answer...
        await harness.history.get(Conversation(w.general.id, w.guild_id))  # (once the bot has tried to store it)
        assert await other_process.get(Conversation(w.general.id, w.guild_id)) == []  # ...and it is not kept
    finally:
        await other_process.close()
