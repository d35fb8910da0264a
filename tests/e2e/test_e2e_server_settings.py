"""End to end: a server's admins decide where the bot speaks, to whom and as whom (`/bot`, `/persona`),
through the fake Discord with the real ChatBot on a scripted engine that records its prompts."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest

from bot.core.guild_settings import SETTINGS_TTL_S
from tests.fake_discord import BotFactory, BotHarness, CommandNotAvailable, FakeDiscord
from tests.fake_discord.world import Channel, User
from tests.scripted_engine import ScriptedEngine

EPHEMERAL = 64
MANAGE_GUILD = 32


async def private(fake: FakeDiscord, interaction: Any) -> str:
    response = await fake.wait_response(interaction)
    assert response["data"]["flags"] & EPHEMERAL, "admins' answers are visible only to them"
    return str(response["data"]["content"])


async def run(fake: FakeDiscord, user: User, channel: Channel, command: str, /, **options: Any) -> str:
    return await private(fake, await fake.slash(user, channel, command, **options))


def replies_to(fake: FakeDiscord, message: dict[str, Any]) -> list[str]:
    return [
        m["content"] for m in fake.bot_messages if (m.get("message_reference") or {}).get("message_id") == message["id"]
    ]


async def unanswered(fake: FakeDiscord, engine: ScriptedEngine, message: dict[str, Any], barrier: Channel) -> None:
    """`message` gets no answer: a later mention elsewhere is answered first, and the engine never saw it."""
    assert await fake.ask(fake.world.owner, barrier, "barrier") == "re: barrier"
    assert replies_to(fake, message) == []
    said = message["content"].split("> ", 1)[-1]
    assert all(turns[-1].text != said for turns in engine.seen), f"the engine was asked {said!r}"


@pytest.fixture
async def scripted(bot_factory: BotFactory) -> tuple[BotHarness, ScriptedEngine]:
    engine = ScriptedEngine()
    return await bot_factory(engine=engine), engine


async def test_admin_commands_are_synced_for_manage_server_in_servers_only(
    scripted: tuple[BotHarness, ScriptedEngine],
) -> None:
    fake = scripted[0].fake
    for name in ("bot", "persona"):
        command = fake.commands[(None, name)]
        assert command["default_member_permissions"] == str(MANAGE_GUILD)
        assert command["contexts"] == [0]
    subcommands = {o["name"] for o in fake.commands[(None, "bot")]["options"]}
    assert subcommands == {"show", "allow", "block", "unlist", "listen", "ignore"}
    assert {o["name"] for o in fake.commands[(None, "persona")]["options"]} == {"set", "show", "clear"}


async def test_a_plain_member_and_a_moderator_are_refused(scripted: tuple[BotHarness, ScriptedEngine]) -> None:
    harness, _ = scripted
    fake, w = harness.fake, harness.fake.world
    with pytest.raises(CommandNotAvailable):  # Discord hides it from them...
        await fake.slash(w.member, w.general, "bot show")
    # ...and when it arrives anyway, the bot's own check refuses it (Manage Messages is not Manage Server).
    for user in (w.member, w.admin):
        text = await private(fake, await fake.slash(user, w.general, "bot block", force=True, channel=w.general))
        assert text == "You need the **Manage Server** permission to do that."
        text = await private(fake, await fake.slash(user, w.general, "persona set", force=True, text="a pirate"))
        assert "Manage Server" in text
    assert await harness.history.guild_settings(w.guild_id) == []


async def test_blocked_channel_is_silent_and_its_thread_too(
    scripted: tuple[BotHarness, ScriptedEngine], caplog: pytest.LogCaptureFixture
) -> None:
    harness, engine = scripted
    fake, w = harness.fake, harness.fake.world
    assert "Blocked" in await run(fake, w.owner, w.random, "bot block", channel=w.general)
    caplog.set_level("DEBUG", logger="cogs.chat")
    await unanswered(fake, engine, await fake.mention(w.member, w.general, "hello?"), w.random)
    await unanswered(fake, engine, await fake.mention(w.member, w.thread, "in the thread?"), w.random)
    assert "may not speak in channel" in caplog.text
    # Unlisted, it answers again.
    await run(fake, w.owner, w.random, "bot unlist", channel=w.general)
    assert await fake.ask(w.member, w.thread, "and now?") == "re: and now?"


async def test_allow_list_by_category_and_a_channel_entry_wins(scripted: tuple[BotHarness, ScriptedEngine]) -> None:
    harness, engine = scripted
    fake, w = harness.fake, harness.fake.world
    lounge = await fake.add_category("Lounge")
    chat = await fake.add_text_channel("chat", category=lounge)
    quiet = await fake.add_text_channel("quiet", category=lounge)
    with pytest.raises(CommandNotAvailable):  # a thread follows its parent: not a place of its own
        await fake.slash(w.owner, w.general, "bot allow", channel=w.thread)
    await run(fake, w.owner, w.general, "bot allow", channel=lounge)
    await run(fake, w.owner, w.general, "bot block", channel=quiet)
    assert await fake.ask(w.member, chat, "in the lounge") == "re: in the lounge"
    await unanswered(fake, engine, await fake.mention(w.member, quiet, "here?"), chat)
    await unanswered(fake, engine, await fake.mention(w.member, w.random, "outside?"), chat)
    shown = await run(fake, w.owner, w.general, "bot show")
    assert f"Only in: <#{lounge.id}>" in shown and f"Never in: <#{quiet.id}>" in shown


async def test_bot_show_with_many_personas_comes_in_messages_discord_accepts(
    scripted: tuple[BotHarness, ScriptedEngine],
) -> None:
    """Twelve channels with long personas are more than 2,000 characters: several ephemeral messages."""
    harness, _ = scripted
    fake, w = harness.fake, harness.fake.world
    channels = [await fake.add_text_channel(f"room-{i}") for i in range(12)]
    for channel in channels:
        text = f"You are the keeper of #{channel.name}. " + "You answer in rhyme and never in prose. " * 5
        assert "Persona set" in await run(fake, w.owner, channel, "persona set", text=text, scope="channel")
    interaction = await fake.slash(w.owner, w.general, "bot show")
    await private(fake, interaction)
    await fake.wait_for(lambda: len(interaction.followups) >= 2, what="the rest of /bot show")
    await asyncio.sleep(0.2)  # any piece still on its way
    pieces = [f["content"] for f in interaction.followups]
    assert all(len(p) <= 2000 and f["flags"] & EPHEMERAL for p, f in zip(pieces, interaction.followups, strict=True))
    shown = "\n".join(pieces)
    assert shown.startswith("**Where I answer**") and all(f"<#{c.id}>: `You are the keeper" in shown for c in channels)


async def test_listening_channel_answers_without_a_mention_at_its_pace(
    scripted: tuple[BotHarness, ScriptedEngine],
) -> None:
    harness, engine = scripted
    fake, w = harness.fake, harness.fake.world
    text = await run(fake, w.owner, w.general, "bot listen", channel=w.random, pace=60.0)
    assert "at most one per 60s" in text
    first = await fake.send(w.member, w.random, "anyone around?")
    assert (await fake.wait_reply(first))["content"] == "re: anyone around?"
    # The pace holds: the next unaddressed message within 60 s is left alone; a mention is still answered.
    await unanswered(fake, engine, await fake.send(w.carol, w.random, "me too"), w.random)
    # Not other bots, not people replying to each other.
    await unanswered(fake, engine, await fake.send(w.other_bot, w.random, "beep"), w.general)
    await unanswered(fake, engine, await fake.send(w.carol, w.random, "hi Bob", reply_to=first), w.general)
    # A thread listens where its parent does; a channel not listening still needs a mention.
    await run(fake, w.owner, w.general, "bot listen", channel=w.general, pace=1.0)
    said = await fake.send(w.member, w.thread, "thread talk")
    assert (await fake.wait_reply(said))["content"] == "re: thread talk"
    lounge = await fake.add_text_channel("lounge")
    await unanswered(fake, engine, await fake.send(w.member, lounge, "just chatting"), w.general)
    await run(fake, w.owner, w.general, "bot listen", channel=w.random, on=False)
    assert f"<#{w.general.id}> (one reply per 1s)" in await run(fake, w.owner, w.general, "bot show")


async def test_ignored_member_and_role(scripted: tuple[BotHarness, ScriptedEngine]) -> None:
    harness, engine = scripted
    fake, w = harness.fake, harness.fake.world
    await run(fake, w.owner, w.general, "bot ignore", who=w.carol)
    await run(fake, w.owner, w.general, "bot ignore", who=w.fans_role)  # Bob is a Fan
    await unanswered(fake, engine, await fake.mention(w.carol, w.general, "it's Carol"), w.random)
    await unanswered(fake, engine, await fake.mention(w.member, w.general, "it's Bob"), w.random)
    shown = await run(fake, w.owner, w.general, "bot show")
    assert f"<@{w.carol.id}>" in shown and f"<@&{w.fans_role.id}>" in shown
    await run(fake, w.owner, w.general, "bot ignore", who=w.fans_role, on=False)
    assert await fake.ask(w.member, w.general, "back") == "re: back"


async def test_persona_reaches_the_prompt_channel_over_server(scripted: tuple[BotHarness, ScriptedEngine]) -> None:
    harness, engine = scripted
    fake, w = harness.fake, harness.fake.world
    await fake.ask(w.member, w.general, "before")
    assert engine.system_prompts[-1] is None  # SYSTEM_PROMPT, as the engine has it
    text = await run(fake, w.owner, w.general, "persona set", text="You are a pirate in {server}, #{channel}, {date}.")
    assert "Persona set for this server" in text
    await run(fake, w.owner, w.random, "persona set", text="You are a poet in #{channel}.", scope="channel")
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    await fake.ask(w.member, w.general, "ahoy")
    assert engine.system_prompts[-1] == f"You are a pirate in Test Server, #general, {today}."
    await fake.ask(w.member, w.random, "a verse")
    assert engine.system_prompts[-1] == "You are a poet in #random."
    shown = await run(fake, w.owner, w.random, "persona show")
    assert "from this channel" in shown and "poet" in shown
    await run(fake, w.owner, w.random, "persona clear", scope="channel")
    await fake.ask(w.member, w.random, "and now")
    assert engine.system_prompts[-1] == f"You are a pirate in Test Server, #random, {today}."
    await fake.ask(w.member, w.dm_with(w.member), "in a DM")
    assert engine.system_prompts[-1] is None  # a DM belongs to no server
    await run(fake, w.owner, w.random, "persona clear")
    await fake.ask(w.member, w.random, "plain")
    assert engine.system_prompts[-1] is None


async def test_too_long_persona_is_refused_with_the_numbers(scripted: tuple[BotHarness, ScriptedEngine]) -> None:
    harness, engine = scripted
    fake, w = harness.fake, harness.fake.world
    engine.context_words = 5
    text = await run(fake, w.owner, w.general, "persona set", text="one two three four five six seven")
    assert (
        text == "That persona is too long for the model: it takes 7 of the 5 words this engine reads. Nothing changed."
    )
    assert await harness.history.guild_settings(w.guild_id) == []
    engine.uses_system_prompt = False  # as BlenderBot: kept, and the admin is told it has no effect
    assert "BlenderBot" in await run(fake, w.owner, w.general, "persona set", text="short")


async def test_dms_unanswered_with_allow_dms_off(bot_factory: BotFactory) -> None:
    engine = ScriptedEngine()
    harness = await bot_factory(engine=engine, allow_dms=False)
    fake, w = harness.fake, harness.fake.world
    await unanswered(fake, engine, await fake.send(w.member, w.dm_with(w.member), "psst"), w.general)


async def test_settings_go_when_the_bot_leaves_the_server(scripted: tuple[BotHarness, ScriptedEngine]) -> None:
    harness, _ = scripted
    fake, w = harness.fake, harness.fake.world
    other, general = w.add_guild("Other")
    await fake.dispatch("GUILD_CREATE", w.guild_payload(other.id))  # the bot joins it
    await run(fake, w.owner, w.general, "persona set", text="a pirate")
    await run(fake, w.owner, general, "persona set", text="a poet")
    assert await harness.history.guild_settings(w.guild_id) == [("persona", 0, "a pirate")]
    await fake.remove_bot(w.guild_id)
    for _ in range(500):
        if not await harness.history.guild_settings(w.guild_id):
            break
        await asyncio.sleep(0.01)
    assert await harness.history.guild_settings(w.guild_id) == []
    assert await harness.history.guild_settings(other.id) == [("persona", 0, "a poet")]  # not the other server's


async def test_two_processes_sharing_the_database_agree(
    fake_discord: FakeDiscord, bot_factory: BotFactory, tmp_path: Any
) -> None:
    """Two bot processes (shard 0 and shard 1 of 2) on one history file: a change made through one is in
    force in the other within SETTINGS_TTL_S, though the other had just read the old settings."""
    fake, w = fake_discord, fake_discord.world
    servers = {shard: w.add_guild(f"Shard {shard} server", shard=(shard, 2))[1] for shard in (0, 1)}
    db = tmp_path / "shared.sqlite3"
    engines = [ScriptedEngine(), ScriptedEngine()]
    a = await bot_factory(engine=engines[0], shard_count=2, shard_ids=(0,), history_db=db)
    b = await bot_factory(engine=engines[1], shard_count=2, shard_ids=(1,), history_db=db)
    here = servers[0]  # its events, commands included, go to process a
    assert (await b.chat.guilds.get(here.guild_id)).persona is None  # b holds a copy of the old settings
    await run(fake, w.owner, here, "persona set", text="a pirate")
    await run(fake, w.owner, here, "bot block", channel=here)
    changed = time.monotonic()
    assert (await a.chat.guilds.get(here.guild_id)).persona == "a pirate"  # at once where it was made
    while (await b.chat.guilds.get(here.guild_id)).persona is None:
        assert time.monotonic() - changed < SETTINGS_TTL_S + 1.0, "the other process never saw the change"
        await asyncio.sleep(0.05)
    assert not (await b.chat.guilds.get(here.guild_id)).may_speak(here.id, None)
    # And the other way round, with what the other process then does: b answers as a's change says.
    there = servers[1]
    assert await fake.ask(w.member, there, "hi") == "re: hi"
    assert engines[1].system_prompts[-1] is None
    await run(fake, w.owner, there, "persona set", text="a poet in {server}")
    assert await fake.ask(w.member, there, "hi again") == "re: hi again"
    assert engines[1].system_prompts[-1] == "a poet in Shard 1 server"
