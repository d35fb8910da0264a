"""The fake Discord keeps the end-to-end tests honest only if it refuses what Discord refuses.

These drive it through the real discord.py client (the bot's own HTTP session) and a raw websocket.
"""

from __future__ import annotations

import json
import zlib

import aiohttp
import discord
import pytest

from tests.fake_discord import BotHarness, FakeDiscord


async def test_fake_refuses_what_discord_refuses(harness: BotHarness) -> None:
    w = harness.fake.world
    harness.allowed_failed_calls = lambda call: True
    harness.check_mentions = False  # this test posts through the bot's client itself
    channel = harness.bot.get_channel(w.general.id)
    assert isinstance(channel, discord.TextChannel)

    with pytest.raises(discord.HTTPException) as empty:
        await channel.send("   ")
    assert (empty.value.status, empty.value.code) == (400, 50006)

    with pytest.raises(discord.HTTPException) as too_long:
        await channel.send("x" * 2001)
    assert (too_long.value.status, too_long.value.code) == (400, 50035)
    assert "2000" in str(too_long.value)
    assert (await channel.send("x" * 2000)).content == "x" * 2000

    with pytest.raises(discord.NotFound) as unknown:
        await harness.bot.http.send_message(123456789012345678, params=discord.http.handle_message_parameters("hi"))
    assert unknown.value.code == 10003

    missing = discord.MessageReference(message_id=123456789012345678, channel_id=w.general.id)
    with pytest.raises(discord.HTTPException) as bad_reference:
        await channel.send("hi", reference=missing)
    assert bad_reference.value.code == 50035
    lenient = discord.MessageReference(message_id=123456789012345678, channel_id=w.general.id, fail_if_not_exists=False)
    sent = await channel.send("hi", reference=lenient)
    assert sent.reference is None  # Discord drops a reference it can't resolve when told not to fail

    announcements = harness.bot.get_channel(w.announcements.id)
    assert isinstance(announcements, discord.TextChannel)
    with pytest.raises(discord.Forbidden) as forbidden:
        await announcements.send("hi")
    assert forbidden.value.code == 50013


async def test_fake_edits_messages_like_discord(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    harness.allowed_failed_calls = lambda call: True
    harness.check_mentions = False  # this test posts and edits through the bot's client itself
    channel = harness.bot.get_channel(w.general.id)
    assert isinstance(channel, discord.TextChannel)
    edits_seen: list[discord.RawMessageUpdateEvent] = []

    async def on_raw_message_edit(payload: discord.RawMessageUpdateEvent) -> None:
        edits_seen.append(payload)

    harness.bot.add_listener(on_raw_message_edit, "on_raw_message_edit")
    quiet = discord.AllowedMentions.none()
    sent = await channel.send("first words", allowed_mentions=quiet)
    edited = await sent.edit(content=f"first words and more {w.member.mention}", allowed_mentions=quiet)
    assert edited.content == f"first words and more {w.member.mention}" and edited.edited_at is not None
    [edit] = fake.edits_of({"id": str(sent.id)})
    assert edit["allowed_mentions"] == {"parse": []}  # what discord.py sends for AllowedMentions.none()
    assert edit["pings"] == {"users": [], "roles": [], "everyone": False}  # named, but not pinged
    assert fake.message_edits(w.general)[0].time == edit["time"]
    assert fake.messages_by_bot(w.general)[-1]["content"] == edited.content  # the record shows it as it is now
    await fake.wait_for(lambda: edits_seen, what="MESSAGE_UPDATE")
    assert edits_seen[0].message_id == sent.id and edits_seen[0].data["content"] == edited.content

    # Without allowed_mentions, the client's default goes along; a raw edit with none at all would ping.
    await harness.bot.http.edit_message(
        w.general.id, sent.id, params=discord.http.handle_message_parameters(content=f"loud {w.member.mention}")
    )
    assert fake.bot_edits[-1]["pings"]["users"] == [str(w.member.id)]

    with pytest.raises(discord.HTTPException) as empty:
        await sent.edit(content="   ")
    assert (empty.value.status, empty.value.code) == (400, 50006)
    with pytest.raises(discord.HTTPException) as too_long:
        await sent.edit(content="x" * 2001)
    assert (too_long.value.status, too_long.value.code) == (400, 50035)
    assert (await sent.edit(content="x" * 2000)).content == "x" * 2000

    users_message = await fake.send(w.member, w.general, "my own words")
    with pytest.raises(discord.Forbidden) as not_mine:
        await channel.get_partial_message(int(users_message["id"])).edit(content="changed")
    assert not_mine.value.code == 50005
    with pytest.raises(discord.NotFound) as unknown:
        await channel.get_partial_message(123456789012345678).edit(content="changed")
    assert unknown.value.code == 10008


async def test_fake_sends_the_replied_to_message_along(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    question = await fake.mention(w.member, w.general, "hello there")
    answer = await fake.wait_reply(question)
    follow_up = await fake.send(w.member, w.general, "and then?", reply_to=answer, ping_author=False)
    referenced = follow_up["referenced_message"]
    assert referenced["id"] == answer["id"] and referenced["author"]["id"] == str(w.bot_user.id)
    assert "referenced_message" not in referenced  # one level deep, as on Discord
    await fake.delete(answer)
    gone = await fake.send(w.member, w.general, "hello?", reply_to=answer, ping_author=False)
    assert gone["referenced_message"] is None and gone["message_reference"]["message_id"] == answer["id"]
    await fake.wait_reply(follow_up)
    await fake.wait_reply(await fake.mention(w.carol, w.general, "are you there"))  # "hello?" was not for the bot
    assert not any(
        (m.get("message_reference") or {}).get("message_id") == gone["id"] for m in fake.messages_by_bot(w.general)
    )


async def test_fake_refuses_a_second_interaction_response(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    harness.allowed_failed_calls = lambda call: True
    harness.check_mentions = False  # this test posts through the bot's client itself
    got: list[discord.Interaction] = []

    async def on_interaction(interaction: discord.Interaction) -> None:
        got.append(interaction)

    harness.bot.add_listener(on_interaction, "on_interaction")
    record = await fake.slash(w.member, w.general, "stats")
    await fake.wait_response(record)
    await fake.wait_for(lambda: got, what="the interaction event")
    adapter = discord.webhook.async_.async_context.get()
    params = discord.webhook.async_.interaction_message_response_params(type=4, content="again")
    with pytest.raises(discord.HTTPException) as twice:
        await adapter.create_interaction_response(record.id, record.token, session=got[0]._session, params=params)
    assert twice.value.code == 40060


async def test_fake_gateway_and_rest_check_the_token(fake_discord: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(fake_discord.api_base + "/gateway/bot", headers={"Authorization": "Bot nope"}) as r:
            assert r.status == 401
            assert (await r.json())["code"] == 0
        headers = {"Authorization": f"Bot {fake_discord.token}"}
        async with session.get(fake_discord.api_base + "/gateway/bot", headers=headers) as r:
            assert (await r.json())["url"] == fake_discord.gateway_url
        async with session.ws_connect(fake_discord.gateway_url + "?v=10&encoding=json&compress=zlib-stream") as ws:
            inflate = zlib.decompressobj()
            hello = json.loads(inflate.decompress(await ws.receive_bytes()))
            assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] == fake_discord.heartbeat_interval_ms
            await ws.send_json({"op": 2, "d": {"token": "nope", "intents": 513, "properties": {}}})
            closed = await ws.receive()
            assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4004
    assert fake_discord.refusals == [4004] and fake_discord.identifies == 0
