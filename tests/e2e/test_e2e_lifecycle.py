"""End to end: nothing lost across restarts, shutdowns, slow generations and rate limits.

History survives a restart of the bot; SIGTERM with replies in flight tells every user something
(the finished reply or the restart notice, exactly one answer each) and exits cleanly; a generation
that runs past GENERATION_TIMEOUT_SECONDS gets the timeout notice and the bot carries on; the
per-user cooldown sends one notice per window.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bot.core.outcomes import CLOSING_TEXT, TIMEOUT_TEXT
from bot.core.types import Conversation, Turn
from bot.engine.seq2seq import Seq2SeqRunner
from cogs.chat import COOLDOWN_TEXT
from tests.e2e.processes import launch
from tests.fake_discord import QUIET, BotFactory, BotHarness, FakeDiscord


def conversation(channel: Any) -> Conversation:
    return Conversation(channel.id, channel.guild_id)


async def test_history_survives_a_restart(fake_discord: FakeDiscord, bot_factory: BotFactory, tmp_path: Path) -> None:
    fake, w = fake_discord, fake_discord.world
    db = tmp_path / "kept.sqlite3"
    dm = w.dm_with(w.carol)
    first = await bot_factory(history_db=db)
    a1 = await fake.ask(w.member, w.general, "hello there")
    d1 = await fake.ask(w.carol, dm, "do you have any pets")
    await first.stop()  # closes the gateway, the engine and the database, as run_discord does

    second = await bot_factory(history_db=db)
    assert fake.identifies == 2
    a2 = await fake.ask(w.member, w.general, "what do you like to do for fun")
    d2 = await fake.ask(w.carol, dm, "tell me about space")

    # The new bot saw the old conversation: its replies are those of the continued history...
    general = [
        Turn("user", "hello there", speaker="Bob"),
        Turn("bot", a1),
        Turn("user", "what do you like to do for fun", speaker="Bob"),
    ]
    assert a2 == await second.engine.reply(general)
    assert d2 == await second.engine.reply(
        [Turn("user", "do you have any pets"), Turn("bot", d1), Turn("user", "tell me about space")]
    )
    # ...which differ from a fresh start (otherwise this would prove nothing)...
    assert a2 != await second.engine.reply(general[-1:])
    # ...and every turn, from before and after the restart, is in the store in order.
    assert await second.history.get(conversation(w.general)) == general + [Turn("bot", a2)]
    assert len(await second.history.get(Conversation(dm.id))) == 4


async def test_messages_arriving_together_are_answered_in_order_when_typing_is_slow(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    # Typing requests to one channel run side by side once discord.py knows that channel's rate
    # limit (learnt from this first exchange). Then the first message's typing request is slow to
    # come back and the second's is not: the answers must still come in the order the messages
    # arrived, each seeing the one before it.
    await fake.ask(w.admin, w.general, "what do you like to do for fun")
    fake.typing_delays = [0.5]
    first = await fake.mention(w.member, w.general, "hello there")
    second = await fake.mention(w.carol, w.general, "do you have any pets")
    reply2 = await fake.wait_reply(second)
    reply1 = await fake.wait_reply(first)
    turns = await harness.history.get(conversation(w.general))
    assert turns[2:] == [
        Turn("user", "hello there", speaker="Bob"),
        Turn("bot", reply1["content"]),
        Turn("user", "do you have any pets", speaker="Carol"),
        Turn("bot", reply2["content"]),
    ]
    assert reply2["content"] == await harness.engine.reply(turns[:5])
    # (The second answer may be posted first: the first waits for its typing request to come back.)


class SlowSteps:
    """Makes every decoding step of the model sleep first, while `on` is set (the model stays correct)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.on = threading.Event()
        self.steps_while_on = 0
        self.original = Seq2SeqRunner.step

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = self.original

        def step(runner: Any, *args: Any, **kwargs: Any) -> Any:
            if self.on.is_set():
                self.steps_while_on += 1
                time.sleep(self.seconds)
            return original(runner, *args, **kwargs)

        monkeypatch.setattr(Seq2SeqRunner, "step", step)


async def test_generation_deadline_through_discord(bot_factory: BotFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowSteps(0.2)
    slow.install(monkeypatch)
    # Greedy, exactly 8 new tokens: at 0.2 s a step the slow reply needs 1.6 s, past the 0.5 s deadline.
    harness = await bot_factory(generation_timeout_seconds=0.5, num_beams=1, min_new_tokens=8, max_new_tokens=8)
    fake, w = harness.fake, harness.fake.world

    slow.on.set()
    started = time.monotonic()
    timed_out = await fake.mention(w.member, w.general, "tell me a very long story")
    notice = await fake.wait_reply(timed_out, timeout=30)
    assert notice["content"] == TIMEOUT_TEXT
    assert time.monotonic() - started < 1.5  # stopped at the deadline, not after the whole reply
    assert 1 <= slow.steps_while_on < 8
    slow.on.clear()

    # The next message is answered normally; the timed-out one left nothing in the history.
    reply = await fake.ask(w.member, w.general, "hello there", timeout=30)
    assert reply == await harness.engine.reply([Turn("user", "hello there")])
    assert await harness.history.get(conversation(w.general)) == [
        Turn("user", "hello there", speaker="Bob"),
        Turn("bot", reply),
    ]
    answered = [m["message_reference"]["message_id"] for m in fake.messages_by_bot(w.general)]
    assert answered.count(timed_out["id"]) == 1 and len(answered) == 2


async def test_cooldown_gives_one_notice_per_window(bot_factory: BotFactory) -> None:
    window = 2.0
    harness = await bot_factory(user_cooldown_seconds=window)
    fake, w = harness.fake, harness.fake.world
    notices = 0

    async def one_window(other: Any) -> None:
        nonlocal notices
        first = await fake.mention(w.member, w.general, "hello there")
        reply = await fake.wait_reply(first)
        window_ends = time.monotonic() + window  # the window began before the reply was posted
        assert reply["content"] not in (COOLDOWN_TEXT.format(seconds=window),)
        too_soon = [await fake.mention(w.member, w.general, f"again {i}") for i in range(3)]
        notice = await fake.wait_reply(too_soon[0])
        notices += 1
        assert notice["content"].startswith("You're sending messages faster than I can answer.")
        # Someone else has their own bucket: answered at once, and that answer is a barrier for Bob's messages.
        assert (await fake.ask(other, w.general, "do you have any pets")) != notice["content"]
        answered = {m["message_reference"]["message_id"] for m in fake.messages_by_bot(w.general)}
        assert not answered & {m["id"] for m in too_soon[1:]}, "more than one notice in a window"
        assert time.monotonic() < window_ends, "the machine was too slow to test inside one window"
        await asyncio.sleep(max(0.0, window_ends - time.monotonic()) + 0.1)  # let the window pass

    await one_window(w.carol)
    await one_window(w.admin)  # a new window for Bob: answered again, then one new notice
    assert notices == 2
    # Only the answered messages are history: two of Bob's and one each of Carol's and Alice's, with replies.
    assert len(await harness.history.get(conversation(w.general))) == 8


async def test_sigterm_with_replies_in_flight_tells_everyone_and_exits_cleanly(
    fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake, w = fake_discord, fake_discord.world
    # Every reply takes 8 steps of 0.4 s: far longer than the 1 s of grace.
    bot = await launch(
        fake,
        tmp_path,
        tiny_model_dir,
        SHUTDOWN_GRACE_SECONDS="1",
        TEST_SLOW_STEP_S="0.4",
        NUM_BEAMS="1",
        MIN_NEW_TOKENS="8",
        MAX_NEW_TOKENS="8",
    )
    dm = w.dm_with(w.admin)
    try:
        await fake.wait_ready_session(timeout=120)
        await bot.wait_stderr("logged in as", timeout=60)
        in_flight = [
            await fake.mention(w.member, w.general, "hello there"),
            await fake.mention(w.carol, w.random, "do you have any pets"),
            await fake.send(w.admin, dm, "tell me about space"),
            await fake.mention(w.carol, w.general, "and what about music"),  # waits behind the first
        ]
        await fake.wait_for(
            lambda: len(fake.typing_calls(w.general)) >= 2 and fake.typing_calls(w.random) and fake.typing_calls(dm),
            timeout=30,
            what="every message to be in progress",
        )
        bot.process.send_signal(signal.SIGTERM)
        await bot.wait_stderr("stopping: finishing replies in progress", timeout=30)
        late = await fake.mention(w.member, w.thread, "are you still there")  # during the grace period
        code = await bot.finish(60)
    finally:
        await bot.kill()

    stderr = bot.stderr
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Traceback" not in bot.stdout, stderr
    assert "abandoning replies still in progress" in stderr
    answers: dict[str, list[str]] = {}
    for posted in fake.bot_messages:
        answers.setdefault((posted.get("message_reference") or {}).get("message_id"), []).append(posted["content"])
    # Nothing lost: every message got exactly one answer, and nothing else was posted.
    assert {m["id"] for m in in_flight + [late]} == set(answers), answers
    assert all(len(texts) == 1 for texts in answers.values()), answers
    assert answers[late["id"]] == [CLOSING_TEXT]  # not accepting new work any more
    assert answers[in_flight[0]["id"]] == [CLOSING_TEXT]  # abandoned mid-generation, and told so
    finished = [texts[0] for texts in answers.values() if texts[0] != CLOSING_TEXT]
    for call in fake.message_posts():
        assert call.status == 200 and call.json["allowed_mentions"] == QUIET
    # Only finished replies are history: an abandoned message leaves no half-turn behind.
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        rows = db.execute("SELECT role, text FROM turns ORDER BY id").fetchall()
    assert len(rows) == 2 * len(finished)
    assert sorted(text for role, text in rows if role == "bot") == sorted(finished)
