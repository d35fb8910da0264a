"""End to end, the scale-out topology: two bot processes, one shared database, one shared model server.

One fake Discord with a server on each of 2 shards; one PostgreSQL database; one Ray Serve app
(`python -m bot.serve`, 2 replicas, the tiny chat model, greedy, fp32); two real `python -m bot`
processes with SHARD_COUNT=2, one running shard 0 (process A: it also gets the DMs) and one shard 1
(process B), both with HISTORY_DB on the database and ENGINE_URL on the app. Everything is started
once for the module; each test uses its own user and channels, so the tests stay independent.

Process B reaches the app through a pass-through TCP relay (tests/e2e/relay.py). It changes nothing
about what is said, but it keeps a copy of B's engine requests (the prompts the model sees) and can
hold one back: that is how a reply of B's is caught in flight, since the app runs in other processes
and cannot be slowed from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot.core.outcomes import BUSY_TEXT, CLOSING_TEXT, EMPTY_REPLY_TEXT, ERROR_TEXT, TIMEOUT_TEXT
from bot.core.types import Conversation
from bot.history import HistoryStore, open_store
from tests.e2e.processes import BotProcess, launch
from tests.e2e.relay import Relay
from tests.fake_discord import FakeDiscord
from tests.fake_discord.world import Channel, Member, User
from tests.fake_openai import free_port
from tests.postgres import PostgresServer
from tests.serve_app import STOPPED_LINE, ServeProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOTICES = {BUSY_TEXT, CLOSING_TEXT, EMPTY_REPLY_TEXT, ERROR_TEXT, TIMEOUT_TEXT}
# One user and one channel on each shard per test (made before the bots connect: they see them at READY).
PLACES = ("shards", "dm", "forget", "in_flight", "restart")
REPLY_TIMEOUT_S = 60.0  # a busy 2-core machine: a reply is well under a second otherwise


@dataclass
class Place:
    user: User
    channels: dict[int, Channel]  # shard id -> a channel of that shard's server


@dataclass
class Topology:
    fake: FakeDiscord
    bots: dict[int, BotProcess]  # shard id -> the process running it
    metrics: dict[int, str]  # shard id -> that process's /metrics URL
    serve: ServeProcess
    relay: Relay  # between process B (shard 1) and the app
    store: HistoryStore  # on the bots' database, as a third process would open it
    places: dict[str, Place]

    def ask(self, place: Place, shard: int, text: str) -> asyncio.Future[str]:
        return asyncio.ensure_future(self.fake.ask(place.user, place.channels[shard], text, timeout=REPLY_TIMEOUT_S))


def build_world(fake: FakeDiscord) -> dict[str, Place]:
    """A server on each shard of 2, and a user with a channel in each per test."""
    w = fake.world
    users = {}
    for name in PLACES:
        user = User(w.ids.next(), name.replace("_", ""), global_name=name.replace("_", " ").title())
        w.users[user.id] = user
        w.members[user.id] = Member(user, [])
        users[name] = user
    guilds = {shard: fake.world.add_guild(f"Shard {shard} server", shard=(shard, 2))[0].id for shard in (0, 1)}
    return {
        name: Place(users[name], {s: w.add_text_channel(name, guild_id=g) for s, g in guilds.items()})
        for name in PLACES
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def topology(
    tiny_chat_model_dir: Path, postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Topology]:
    root = tmp_path_factory.mktemp("scaleout")
    async with contextlib.AsyncExitStack() as stack:
        database = postgres_server.create_database()
        stack.callback(postgres_server.drop_database, database)
        db_url = postgres_server.url(database)
        fake = await stack.enter_async_context(FakeDiscord())
        places = build_world(fake)

        serve = ServeProcess(tiny_chat_model_dir, root / "serve", SERVE_REPLICAS="2")
        stack.push_async_callback(stop_serve, serve)
        starting = asyncio.ensure_future(asyncio.to_thread(serve.start))  # Ray takes a while: start the bots meanwhile
        stack.push_async_callback(settle, starting)  # stopped once started
        relay = Relay(serve.port)
        await relay.start()
        stack.push_async_callback(relay.stop)

        bots: dict[int, BotProcess] = {}
        stack.push_async_callback(stop_bots, bots)
        metrics = {}
        for shard, engine_url in ((0, serve.url), (1, relay.url)):
            port = free_port()
            metrics[shard] = f"http://127.0.0.1:{port}/metrics"
            bots[shard] = await launch(
                fake,
                root / f"bot-{shard}",
                tiny_chat_model_dir,  # the model's name only: the app runs it
                SHARD_COUNT="2",
                SHARD_IDS=str(shard),
                HISTORY_DB=db_url,
                ENGINE_URL=engine_url,
                SAMPLING="false",
                STREAM_REPLIES="false",  # each reply posted once, whole: what `ask` reads is the answer
                METRICS_PORT=str(port),
            )
        await starting
        for bot in bots.values():
            await bot.wait_stderr("logged in as", timeout=120)
        await fake.wait_for(lambda: (None, "forget-me") in fake.commands, what="the slash commands synced")
        store = await open_store(db_url, max_turns=20)
        stack.push_async_callback(store.close)
        yield Topology(fake, bots, metrics, serve, relay, store, places)


async def settle(task: asyncio.Future[None]) -> None:
    """Wait for `task` to end, however it ends (its error, if any, is reported where it is awaited)."""
    await asyncio.gather(task, return_exceptions=True)


async def stop_bots(bots: dict[int, BotProcess]) -> None:
    """SIGTERM each bot; both must exit cleanly (each is killed if it does not)."""
    codes = {}
    for bot in bots.values():
        if bot.process.returncode is None:
            bot.process.send_signal(signal.SIGTERM)
    for shard, bot in bots.items():
        codes[shard] = await bot.finish(60)
    assert all(code == 0 for code in codes.values()), {s: (codes[s], bots[s].stderr[-2000:]) for s in bots}


async def stop_serve(serve: ServeProcess) -> None:
    """Stop the app with every Ray process it started (ServeProcess.stop fails on leftovers)."""
    running = serve.process is not None and serve.process.poll() is None
    stops = serve.output.count(STOPPED_LINE)
    code = await asyncio.to_thread(serve.stop)
    if running:
        assert code == 0 and serve.output.count(STOPPED_LINE) == stops + 1, serve.output[-3000:]


async def ok_replies(topology: Topology) -> dict[int, float]:
    """Each process's count of the model's answers (chatbot_replies_total{kind="ok"})."""
    counts = {}
    async with aiohttp.ClientSession() as session:
        for shard, url in topology.metrics.items():
            async with session.get(url) as response:
                text = await response.text()
            counts[shard] = sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "chatbot_replies_total" and sample.labels.get("kind") == "ok"
            )
    return counts


def answers_to(fake: FakeDiscord, message: dict[str, object]) -> list[str]:
    return [
        m["content"] for m in fake.bot_messages if (m.get("message_reference") or {}).get("message_id") == message["id"]
    ]


def conversation(channel: Channel) -> Conversation:
    return Conversation(channel.id, channel.guild_id)


async def stored(topology: Topology, channel: Channel, *, expect: int = 0) -> list[tuple[str, str]]:
    """The channel's stored turns, once there are `expect` of them (or after 10 s): a bot stores a reply
    just after posting it, so a test that has seen the reply may read the history a moment early."""
    for _ in range(200):
        turns = await topology.store.get(conversation(channel))
        if len(turns) >= expect:
            break
        await asyncio.sleep(0.05)
    return [(turn.role, turn.text) for turn in turns]


async def test_each_shard_is_answered_by_the_process_running_it(topology: Topology) -> None:
    fake, place = topology.fake, topology.places["shards"]
    before = await ok_replies(topology)
    sent_before = len(topology.relay.sent)
    for shard in (0, 1):
        message = await fake.mention(place.user, place.channels[shard], f"hello from shard {shard}")
        reply = await fake.wait_reply(message, timeout=REPLY_TIMEOUT_S)
        assert reply["content"] and reply["content"] not in NOTICES
        assert answers_to(fake, message) == [reply["content"]]
        assert await stored(topology, place.channels[shard], expect=2) == [
            ("user", f"hello from shard {shard}"),
            ("bot", reply["content"]),
        ]
    after = await ok_replies(topology)
    assert {s: after[s] - before[s] for s in after} == {0: 1, 1: 1}  # one answer by each process
    # The fake sent each server's messages only to the session of its shard...
    for shard, channel in place.channels.items():
        sessions = {s for s, event, g in fake.deliveries if event == "MESSAGE_CREATE" and g == channel.guild_id}
        assert sessions == {(shard, 2)}
    # ...and only B's prompt went through B's relay.
    sent = bytes(topology.relay.sent[sent_before:])
    assert b"hello from shard 1" in sent and b"hello from shard 0" not in sent


async def test_a_dm_is_answered_once_by_the_process_running_shard_zero(topology: Topology) -> None:
    fake, user = topology.fake, topology.places["dm"].user
    dm_channel = fake.world.dm_with(user)
    before = await ok_replies(topology)
    sent_before, delivered_before = len(topology.relay.sent), len(fake.deliveries)
    message = await fake.send(user, dm_channel, "a private word")
    reply = await fake.wait_reply(message, timeout=REPLY_TIMEOUT_S)
    await asyncio.sleep(0.5)  # a second answer, were one coming, would be posted by now
    assert answers_to(fake, message) == [reply["content"]] and reply["content"] not in NOTICES
    after = await ok_replies(topology)
    assert {s: after[s] - before[s] for s in after} == {0: 1, 1: 0}
    assert b"a private word" not in topology.relay.sent[sent_before:]
    # The message (and the bot's own answer, echoed back as Discord does) went to shard 0's session only.
    assert {s for s, _, g in fake.deliveries[delivered_before:] if g is None} == {(0, 2)}
    assert await stored(topology, dm_channel, expect=2) == [("user", "a private word"), ("bot", reply["content"])]


async def test_forget_me_in_one_process_deletes_what_the_other_stored(topology: Topology) -> None:
    fake, place = topology.fake, topology.places["forget"]
    user = place.user
    kept_by_b = await topology.ask(place, 1, "remember the blue door")
    kept_by_a = await topology.ask(place, 0, "and the red key")
    assert await stored(topology, place.channels[1], expect=2) == [
        ("user", "remember the blue door"),
        ("bot", kept_by_b),
    ]
    assert await stored(topology, place.channels[0], expect=2) == [("user", "and the red key"), ("bot", kept_by_a)]

    response = await fake.wait_response(await fake.slash(user, place.channels[0], "forget-me"))  # run by A
    assert response["data"]["content"] == "Done: I've deleted 4 stored messages of our conversations, everywhere."
    assert f"forgot user {user.id} (4 turns)" in topology.bots[0].stderr
    assert f"forgot user {user.id}" not in topology.bots[1].stderr
    assert await stored(topology, place.channels[1]) == []
    assert await stored(topology, place.channels[0]) == []

    # B's next prompt in that channel holds nothing of before.
    mark = len(topology.relay.sent)
    answer = await topology.ask(place, 1, "what was behind it")
    prompt = bytes(topology.relay.sent[mark:])
    assert b"what was behind it" in prompt and b"blue door" not in prompt
    assert await stored(topology, place.channels[1], expect=2) == [("user", "what was behind it"), ("bot", answer)]


async def test_forget_me_in_one_process_holds_against_a_reply_in_flight_in_the_other(topology: Topology) -> None:
    """B's request to the app is held at the relay, so B has read the history and is waiting for the model
    when /forget-me runs in A; then the relay lets the request go on to the app."""
    fake, place = topology.fake, topology.places["in_flight"]
    user, in_b = place.user, place.channels[1]
    topology.relay.hold()
    try:
        message = await fake.mention(user, in_b, "my secret plan")
        await asyncio.wait_for(topology.relay.held.wait(), REPLY_TIMEOUT_S)  # B is waiting for its answer
        response = await fake.wait_response(await fake.slash(user, place.channels[0], "forget-me"))  # A
        assert response["data"]["content"] == "Done: I've deleted 0 stored messages of our conversations, everywhere."
        assert not answers_to(fake, message)
    finally:
        topology.relay.release()
    reply = await fake.wait_reply(message, timeout=REPLY_TIMEOUT_S)
    assert reply["content"] and reply["content"] not in NOTICES  # the user still gets the answer...
    assert await stored(topology, in_b) == []  # ...but it is not kept, as /forget-me promised
    await topology.bots[1].wait_stderr(f"history of channel {in_b.id} was cleared during a reply; not stored")

    mark = len(topology.relay.sent)
    answer = await topology.ask(place, 1, "what now")
    prompt = bytes(topology.relay.sent[mark:])
    assert b"what now" in prompt and b"secret plan" not in prompt
    assert await stored(topology, in_b, expect=2) == [("user", "what now"), ("bot", answer)]


async def test_the_model_server_stopping_gives_notices_and_its_return_brings_answers_back(
    topology: Topology,
) -> None:
    """Stop the app: each message gets the short notice; start it again on the same port: answers again,
    from the same bot processes (never restarted, never reconnected)."""
    fake, place = topology.fake, topology.places["restart"]
    dm_channel = fake.world.dm_with(place.user)
    pids = {shard: bot.process.pid for shard, bot in topology.bots.items()}
    identifies = fake.identifies
    where = {"shard 0": place.channels[0], "shard 1": place.channels[1], "DM": dm_channel}

    await stop_serve(topology.serve)
    try:
        started = time.monotonic()
        down = {
            name: await fake.ask(place.user, ch, "are you there", timeout=REPLY_TIMEOUT_S) for name, ch in where.items()
        }
        assert down == dict.fromkeys(where, ERROR_TEXT), down  # not silence, not a traceback
        assert time.monotonic() - started < 30  # told at once, not after a timeout
        for channel in where.values():
            assert await stored(topology, channel) == []  # a notice is not a turn
    finally:
        await asyncio.to_thread(topology.serve.start)

    back = {name: await fake.ask(place.user, ch, "are you back", timeout=REPLY_TIMEOUT_S) for name, ch in where.items()}
    assert all(text and text not in NOTICES for text in back.values()), back
    for name, channel in where.items():
        assert await stored(topology, channel, expect=2) == [("user", "are you back"), ("bot", back[name])]
    assert {shard: bot.process.pid for shard, bot in topology.bots.items()} == pids
    assert all(bot.process.returncode is None for bot in topology.bots.values())
    assert fake.identifies == identifies
    assert not any("Traceback" in m["content"] for m in fake.bot_messages)
