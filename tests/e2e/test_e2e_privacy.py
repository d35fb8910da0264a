"""End to end: what the bot keeps and what it says about people.

The real process never writes its token to stdout or stderr, and writes what people said only at
LOG_LEVEL=DEBUG; `/forget-me` through Discord deletes one person's turns in every channel and DM,
and nobody else's.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bot.core.types import Conversation, Turn
from tests.e2e.processes import launch
from tests.fake_discord import BotHarness, FakeDiscord

# Shaped like a real bot token, and unmistakable wherever it might turn up.
TOKEN = "MTE5OTk5OTk5OTk5OTk5OTk5OQ.Gx7Pq2.pr1vate-T0KEN_do-not-LOG_4f9a2c7e1b"
SECRET_GUILD = "my locker code is zebra crossing 4711"
SECRET_DM = "please keep this between us marmalade 9035"
SECRET_EDIT = "edited into tangerine quartz 6620"

EPHEMERAL = 64


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_token_never_logged_and_message_text_only_at_debug(
    level: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    async with FakeDiscord(token=TOKEN) as fake:
        w = fake.world
        bot = await launch(fake, tmp_path, tiny_model_dir, LOG_LEVEL=level)
        try:
            await fake.wait_ready_session(timeout=120)
            guild_reply = await fake.ask(w.member, w.general, SECRET_GUILD, timeout=60)
            dm_reply = await fake.ask(w.carol, w.dm_with(w.carol), SECRET_DM, timeout=60)
            plain = await fake.send(w.member, w.general, "just chatting")
            await fake.edit(plain, f"{w.bot_user.mention} {SECRET_EDIT}")
            interaction = await fake.slash(w.member, w.general, "forget-me")
            await fake.wait_response(interaction, timeout=30)
            await fake.ask(w.member, w.general, "hello there", timeout=60)  # a barrier for the edit
            bot.process.send_signal(signal.SIGTERM)
            code = await bot.finish(60)
        finally:
            await bot.kill()
    logs = bot.stdout + bot.stderr
    assert code == 0, logs
    assert "Traceback" not in logs, logs
    # The token, or any sizeable piece of it, never appears at any level.
    assert TOKEN not in logs
    for part in TOKEN.split("."):
        assert part not in logs, f"a piece of the token was logged: {part}"
    said = [SECRET_GUILD, SECRET_DM]
    if level == "DEBUG":
        # The bot's own debug line records what people said (proving this check can see it)...
        assert all(text in logs for text in said), logs[-3000:]
    else:
        # ...and at INFO nothing people said, nor what the bot answered, is written anywhere.
        for text in said + [SECRET_EDIT, "zebra", "marmalade", "tangerine"]:
            assert text not in logs, f"{text!r} was logged at INFO"
        for reply in (guild_reply, dm_reply):
            if len(reply) >= 8:
                assert reply not in logs, f"the reply {reply!r} was logged at INFO"
    # It is in the history database, which is where it belongs (until /forget-me).
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        texts = {row[0] for row in db.execute("SELECT text FROM turns")}
    assert SECRET_DM in texts and SECRET_GUILD not in texts  # Bob ran /forget-me; Carol did not


async def ephemeral(fake: FakeDiscord, interaction: Any) -> str:
    response = await fake.wait_response(interaction)
    assert response["type"] in (4, 5) and response["data"]["flags"] & EPHEMERAL  # 5: deferred, then a follow-up
    return response["data"]["content"]


async def test_forget_me_through_discord_removes_one_person_everywhere(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    bob_dm, carol_dm = w.dm_with(w.member), w.dm_with(w.carol)

    async def turns(channel: Any) -> list[Turn]:
        return await harness.history.get(Conversation(channel.id, channel.guild_id))

    carol_said = await fake.ask(w.carol, w.general, "do you have any pets")
    await fake.ask(w.member, w.general, "hello there")
    await fake.ask(w.member, w.random, "what do you like to do for fun")
    alice_said = await fake.ask(w.admin, w.random, "tell me about space")
    await fake.ask(w.member, w.thread, "music is my favourite thing")
    await fake.ask(w.member, bob_dm, "i have a dog and two cats")
    await fake.ask(w.member, bob_dm, "where do you live")
    carol_dm_said = await fake.ask(w.carol, carol_dm, "hello there")

    text = await ephemeral(fake, await fake.slash(w.member, w.random, "forget-me"))
    assert text == "Done: I've deleted 10 stored messages of our conversations, everywhere."  # 5 messages, 5 replies
    # Bob is gone from every channel, the thread and his DM; Carol and Alice are untouched.
    assert await turns(w.general) == [Turn("user", "do you have any pets", speaker="Carol"), Turn("bot", carol_said)]
    assert await turns(w.random) == [Turn("user", "tell me about space", speaker="Alice"), Turn("bot", alice_said)]
    assert await turns(w.thread) == [] and await turns(bob_dm) == []
    assert await turns(carol_dm) == [Turn("user", "hello there"), Turn("bot", carol_dm_said)]
    with sqlite3.connect(harness.settings.history_db) as db:
        assert "i have a dog" not in str(db.execute("SELECT text FROM turns").fetchall())

    # In his DM the bot starts over, exactly as in a conversation that never happened.
    again = await fake.ask(w.member, bob_dm, "hello there")
    assert again == await harness.engine.reply([Turn("user", "hello there")])
    # Carol can forget herself from a DM, too; Alice is left alone.
    text = await ephemeral(fake, await fake.slash(w.carol, carol_dm, "forget-me"))
    assert text == "Done: I've deleted 4 stored messages of our conversations, everywhere."
    assert await turns(w.general) == [] and await turns(carol_dm) == []
    assert len(await turns(w.random)) == 2 and len(await turns(bob_dm)) == 2
