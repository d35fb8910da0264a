"""End to end: slash commands of the real ChatBot, delivered as INTERACTION_CREATE by a fake Discord.

The fake behaves like Discord: it only delivers commands the bot synced, hides a command from
members who lack its `default_member_permissions` (tests pass `force=True` to deliver it anyway, as
a stale client or a crafted request could), and refuses late or repeated responses.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from bot.core.types import Conversation, Turn
from tests.fake_discord import BotFactory, BotHarness, CommandNotAvailable, FakeDiscord

EPHEMERAL = 64
MANAGE_MESSAGES = 8192


def conversation(channel) -> Conversation:  # type: ignore[no-untyped-def]
    return Conversation(channel.id, channel.guild_id)


async def ephemeral_text(fake: FakeDiscord, interaction) -> str:  # type: ignore[no-untyped-def]
    response = await fake.wait_response(interaction)
    assert response["type"] in (4, 5)  # a message at once, or deferred ("thinking...") then a follow-up
    assert response["data"]["flags"] & EPHEMERAL, "the answer should be visible only to the user"
    if response["type"] == 5:
        assert interaction.response["data"]["flags"] & EPHEMERAL, "so should the deferral"
    return response["data"]["content"]


async def chat(fake: FakeDiscord, user, channel, *texts: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [await fake.ask(user, channel, text) for text in texts]


async def test_commands_are_synced_globally_with_permission_hints(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    [put] = fake.calls_to("PUT", f"/applications/{w.application_id}/commands")
    assert put.status == 200
    sent = {c["name"]: c for c in put.json}
    assert {"reset", "stats", "forget-me"} <= set(sent)
    assert int(sent["reset"]["default_member_permissions"]) == MANAGE_MESSAGES
    assert sent["stats"]["default_member_permissions"] is None
    assert sent["forget-me"]["default_member_permissions"] is None
    # What Discord stores (and answers) is a string of digits.
    assert fake.commands[(None, "reset")]["default_member_permissions"] == str(MANAGE_MESSAGES)
    scope = next(o for o in sent["reset"]["options"] if o["name"] == "scope")
    assert {c["value"] for c in scope["choices"]} == {"channel", "server"}
    assert not scope.get("required")
    for name in ("reset", "stats", "forget-me"):
        assert sorted(sent[name]["contexts"]) == [0, 1]  # servers and DMs with the bot
    # The admins' /bot and /persona: see test_e2e_server_settings.py


async def test_dev_guild_sync_goes_to_that_guild(fake_discord: FakeDiscord, bot_factory: BotFactory) -> None:
    fake, w = fake_discord, fake_discord.world
    await bot_factory(dev_guild_id=w.guild_id)
    assert not fake.calls_to("PUT", f"/applications/{w.application_id}/commands")
    assert fake.calls_to("PUT", f"/applications/{w.application_id}/guilds/{w.guild_id}/commands")
    assert fake.commands[(w.guild_id, "reset")]["default_member_permissions"] == str(MANAGE_MESSAGES)
    interaction = await fake.slash(w.admin, w.general, "stats")
    assert interaction.payload["data"]["guild_id"] == str(w.guild_id)  # the guild copy ran
    assert "Model" in await ephemeral_text(fake, interaction)


async def test_admin_resets_a_channel(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    a, b, fresh = [await fake.add_text_channel(n) for n in ("chan-a", "chan-b", "fresh")]
    await chat(fake, w.member, a, "hello there", "do you have any pets")
    await chat(fake, w.member, b, "hello there")

    text = await ephemeral_text(fake, await fake.slash(w.admin, a, "reset"))
    assert text == "Done: I've forgotten this conversation (4 messages)."
    assert await harness.history.get(conversation(a)) == []
    assert len(await harness.history.get(conversation(b))) == 2  # other channels keep their history
    # After the reset, A answers exactly like a channel that never talked.
    assert await chat(fake, w.member, a, "what do you like") == await chat(fake, w.member, fresh, "what do you like")


async def test_admin_resets_the_whole_server_but_not_dms(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    dm = w.dm_with(w.member)
    fresh = await fake.add_text_channel("fresh")
    await chat(fake, w.member, w.general, "hello there")
    await chat(fake, w.carol, w.thread, "hello there", "do you have any pets")
    await chat(fake, w.member, dm, "hello there")

    interaction = await fake.slash(w.admin, w.random, "reset", scope="server")
    text = await ephemeral_text(fake, interaction)
    assert text == "Done: I've forgotten every conversation in this server (6 messages)."
    assert await harness.history.get(conversation(w.general)) == []
    assert await harness.history.get(conversation(w.thread)) == []
    assert len(await harness.history.get(Conversation(dm.id))) == 2  # a DM belongs to no server
    expected = await chat(fake, w.admin, fresh, "what do you like")
    assert await chat(fake, w.member, w.general, "what do you like") == expected
    assert await chat(fake, w.carol, w.thread, "what do you like") == expected


async def test_plain_member_cannot_reset(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    await chat(fake, w.member, w.general, "hello there")
    # Discord hides /reset from members without Manage Messages (default_member_permissions)...
    with pytest.raises(CommandNotAvailable):
        await fake.slash(w.member, w.general, "reset")
    # ...and when the interaction arrives anyway, the bot's own check refuses it.
    for options in ({}, {"scope": "server"}):
        text = await ephemeral_text(fake, await fake.slash(w.member, w.general, "reset", force=True, **options))
        assert "Manage Messages" in text
    assert len(await harness.history.get(conversation(w.general))) == 2


async def test_reset_in_a_dm_by_the_user(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    dm = w.dm_with(w.member)
    await chat(fake, w.member, dm, "hello there", "do you have any pets")
    await chat(fake, w.member, w.general, "hello there")

    interaction = await fake.slash(w.member, dm, "reset")  # no permission needed for your own DM
    assert interaction.payload["context"] == 1 and "member" not in interaction.payload
    assert await ephemeral_text(fake, interaction) == "Done: I've forgotten this conversation (4 messages)."
    assert await harness.history.get(Conversation(dm.id)) == []
    assert len(await harness.history.get(conversation(w.general))) == 2

    text = await ephemeral_text(fake, await fake.slash(w.member, dm, "reset", scope="server"))
    assert "no server" in text


async def test_stats_answers_ephemerally_with_the_model_name(harness: BotHarness, tiny_model_dir: Path) -> None:
    fake, w = harness.fake, harness.fake.world
    await chat(fake, w.member, w.general, "hello there", "do you have any pets")
    text = await ephemeral_text(fake, await fake.slash(w.member, w.general, "stats"))
    assert str(tiny_model_dir) in text
    assert "**Replies served:** 2" in text
    assert "cpu" in text and "fp32" in text
    # Also in a DM.
    assert str(tiny_model_dir) in await ephemeral_text(fake, await fake.slash(w.carol, w.dm_with(w.carol), "stats"))


async def test_forget_me_deletes_only_my_messages_everywhere(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    dm = w.dm_with(w.member)
    await chat(fake, w.member, w.general, "hello there")
    await chat(fake, w.carol, w.general, "do you have any pets")
    await chat(fake, w.member, dm, "hello there")

    text = await ephemeral_text(fake, await fake.slash(w.member, w.random, "forget-me"))
    assert text == "Done: I've deleted 4 stored messages of our conversations, everywhere."
    assert await harness.history.get(Conversation(dm.id)) == []
    remaining = await harness.history.get(conversation(w.general))
    assert [t.text for t in remaining if t.role == "user"] == ["do you have any pets"]
    assert remaining[0] == Turn("user", "do you have any pets", speaker="Carol")


async def test_a_command_is_answered_once_and_in_time(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    interaction = await fake.slash(w.member, w.general, "stats")
    await fake.wait_response(interaction)
    [callback] = fake.calls_to("POST", f"/interactions/{interaction.id}/{interaction.token}/callback")
    assert callback.status == 200
    assert callback.time - interaction.created < 3.0
    assert len(interaction.responses) == 1 and not interaction.followups


async def test_an_expired_interaction_is_logged_not_raised(harness: BotHarness) -> None:
    """Discord forgets an interaction after 3 s (one replayed after a RESUME can already be that old)."""
    fake, w = harness.fake, harness.fake.world
    harness.allowed_failed_calls = lambda call: call.status == 404 and call.path.startswith("/interactions/")
    late = await fake.slash(w.member, w.general, "stats", age=5.0)  # too old to answer when it arrives
    await fake.wait_for(lambda: fake.calls_to("POST", f"/interactions/{late.id}/[^/]+/callback"), what="an answer")
    # A barrier: a later command is answered, so the bot is done with the first one.
    assert "Model" in await ephemeral_text(fake, await fake.slash(w.member, w.general, "stats"))
    gc.collect()  # an exception left in a finished task is reported when the task is collected

    assert [c.status for c in fake.calls_to("POST", f"/interactions/{late.id}/[^/]+/callback")] == [404]
    assert not late.responses
    assert not harness.errors.records  # a warning, not an error, and no unhandled task exception
