"""Shards through the fake Discord with the real discord.py client: one process running every shard, two
processes (here two bots in one event loop) splitting them, DMs only on shard 0, and /stats per shard."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from bot.client.run import run_discord
from bot.launch import ExitCode
from tests.fake_discord import BotFactory, FakeDiscord
from tests.fake_discord.harness import bot_settings
from tests.fake_discord.world import Channel, shard_of
from tests.scripted_engine import ScriptedEngine


def two_shard_guilds(fake: FakeDiscord) -> dict[int, Channel]:
    """A server on each of two shards (added before the bots connect): shard id -> its #general."""
    return {shard: fake.world.add_guild(f"Shard {shard} server", shard=(shard, 2))[1] for shard in (0, 1)}


def answers_to(fake: FakeDiscord, message: dict[str, object]) -> list[str]:
    return [
        m["content"] for m in fake.bot_messages if (m.get("message_reference") or {}).get("message_id") == message["id"]
    ]


async def test_one_process_runs_both_shards(
    fake_discord: FakeDiscord, bot_factory: BotFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake, w = fake_discord, fake_discord.world
    channels = two_shard_guilds(fake)
    caplog.set_level(logging.INFO, logger="bot.client")
    harness = await bot_factory(engine=ScriptedEngine(), shard_count=2)
    assert fake.shard_sessions == {0: (0, 2), 1: (1, 2)}
    assert {g.id for g in harness.bot.guilds} == set(w.guilds)  # every guild, whichever shard it is on
    for shard, channel in channels.items():
        assert harness.bot.get_guild(channel.guild_id).shard_id == shard  # type: ignore[union-attr]
        assert await fake.ask(w.member, channel, f"hello shard {shard}") == f"re: hello shard {shard}"
    assert await fake.ask(w.member, w.dm_with(w.member), "a DM") == "re: a DM"
    assert "in 3 servers, running shards 0, 1 of 2" in caplog.text
    assert not fake.calls_to("GET", "/gateway/bot")  # SHARD_COUNT given: Discord is not asked


async def test_shard_count_unset_takes_discords_recommendation(
    fake_discord: FakeDiscord, bot_factory: BotFactory
) -> None:
    fake, w = fake_discord, fake_discord.world
    fake.recommended_shards = 2
    channels = two_shard_guilds(fake)
    harness = await bot_factory(engine=ScriptedEngine())
    assert fake.calls_to("GET", "/gateway/bot") and harness.bot.shard_count == 2
    assert fake.shard_sessions == {0: (0, 2), 1: (1, 2)}
    assert await fake.ask(w.carol, channels[1], "hi") == "re: hi"


async def test_two_processes_split_the_shards_and_only_shard_zero_answers_dms(
    fake_discord: FakeDiscord, bot_factory: BotFactory
) -> None:
    fake, w = fake_discord, fake_discord.world
    fake.heartbeat_interval_ms = 300  # so that each shard has a measured latency for /stats
    channels = two_shard_guilds(fake)
    engines = {0: ScriptedEngine(), 1: ScriptedEngine()}
    bots = {}
    for shard in (0, 1):
        bots[shard] = await bot_factory(engine=engines[shard], shard_count=2, shard_ids=(shard,))
    assert fake.shard_sessions == {0: (0, 2), 1: (1, 2)}
    # The application's commands are registered once, by the process running shard 0.
    assert len(fake.calls_to("PUT", r"/applications/\d+/commands")) == 1
    for shard, channel in channels.items():
        assert {g.id for g in bots[shard].bot.guilds} == {g for g in w.guilds if shard_of(g, 2) == shard}
        message = await fake.mention(w.member, channel, f"for shard {shard}")
        await fake.wait_reply(message)
        assert answers_to(fake, message) == [f"re: for shard {shard}"]
    assert [[t.text for t in seen][-1] for seen in engines[0].seen] == ["for shard 0"]
    assert [[t.text for t in seen][-1] for seen in engines[1].seen] == ["for shard 1"]

    dm = await fake.send(w.admin, w.dm_with(w.admin), "a private word")
    await fake.wait_reply(dm)
    await asyncio.sleep(0.3)  # a second answer, were one coming, would be posted by now
    assert answers_to(fake, dm) == ["re: a private word"]  # once, by shard 0's process
    assert [seen[-1].text for seen in engines[0].seen][-1] == "a private word"
    assert all(seen[-1].text != "a private word" for seen in engines[1].seen)
    # What the fake sent each session: shard 1 only its own guild's events, never a DM.
    to_shard_1 = {guild for shard, event, guild in fake.deliveries if shard == (1, 2) and event != "READY"}
    assert to_shard_1 == {g for g in w.guilds if shard_of(g, 2) == 1}
    assert ((0, 2), "MESSAGE_CREATE", None) in fake.deliveries

    await fake.wait_for(
        lambda: all(b.bot.latencies and all(t < 10 for _, t in b.bot.latencies) for b in bots.values()),
        what="a heartbeat acknowledged on each shard",
    )
    for shard, channel in channels.items():
        response = await fake.wait_response(await fake.slash(w.carol, channel, "stats"))
        text = response["data"]["content"]
        assert f"**This process runs** shard {shard} of 2; **gateway latency:** shard {shard} " in text
        assert text.rstrip().endswith(" ms")


async def test_metrics_per_process_count_only_its_own_replies(
    fake_discord: FakeDiscord, bot_factory: BotFactory
) -> None:
    fake, w = fake_discord, fake_discord.world
    channels = two_shard_guilds(fake)
    bots = [await bot_factory(engine=ScriptedEngine(), shard_count=2, shard_ids=(shard,)) for shard in (0, 1)]
    await fake.ask(w.member, channels[1], "one")
    await fake.ask(w.member, channels[1], "two")
    await fake.ask(w.member, w.dm_with(w.member), "three")
    ok = [b.chat.metrics.registry.get_sample_value("chatbot_replies_total", {"kind": "ok"}) for b in bots]
    assert ok == [1, 2]  # shard 0's process answered the DM, shard 1's the two messages in its server


async def test_the_fake_refuses_invalid_shards(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    fake.required_shards = 2
    headers = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(fake.api_base + "/gateway/bot", headers=headers) as r:
            assert (await r.json())["shards"] == 1  # the recommendation is a separate setting
        for shard, code in (
            ([2, 2], 4010),
            ([-1, 2], 4010),
            ([0, 0], 4010),
            ("0,2", 4010),
            ([0, 1], 4011),
            (None, 4011),
        ):
            async with session.ws_connect(fake.gateway_url + "?v=10&encoding=json") as ws:
                assert json.loads((await ws.receive()).data)["op"] == 10
                identify: dict[str, object] = {"token": fake.token, "intents": 513, "properties": {}}
                if shard is not None:
                    identify["shard"] = shard
                await ws.send_json({"op": 2, "d": identify})
                closed = await ws.receive()
                assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == code, shard
    assert fake.identifies == 0 and fake.shard_sessions == {}


async def test_run_discord_explains_that_discord_requires_more_shards(
    fake_discord: FakeDiscord, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fake_discord.required_shards = 2
    settings = bot_settings(fake_discord, tiny_model_dir, tmp_path / "history.sqlite3", shard_count=1)
    with pytest.raises(ExitCode, match="requires this bot to be sharded") as caught:
        await asyncio.wait_for(run_discord(settings), 60)
    assert caught.value.code == 2 and fake_discord.refusals == [4011]
