"""End to end: the gateway side of the real ChatBot against a fake Discord.

Staying responsive while the model generates (typing, slash commands and heartbeats keep flowing),
surviving RECONNECT + RESUME, and the clear exits of `run_discord` for a refused intent or token.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.client.run import run_discord
from bot.core.types import Conversation, Turn
from bot.engine.seq2seq import Seq2SeqRunner
from bot.launch import ExitCode
from tests.fake_discord import BotFactory, BotHarness, FakeDiscord, bot_settings

HEARTBEAT_MS = 500


class SlowStep:
    """Wraps a decoding step: the real step runs, then the first call holds its thread until released.

    Holding happens in the thread that runs the step; if that thread were the event loop's,
    nothing else (typing, commands, heartbeats) could happen until the hold ended.
    """

    def __init__(self, original: Callable[..., Any], hold_limit_s: float = 10.0) -> None:
        self.original = original
        self.hold_limit_s = hold_limit_s
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        self.started_at: float | None = None
        self.released_at: float | None = None

    def method(self) -> Callable[..., Any]:
        def step(runner: Any, *args: Any, **kwargs: Any) -> Any:
            return self(runner, *args, **kwargs)

        return step

    def __call__(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        output = self.original(model, *args, **kwargs)
        self.threads.append(threading.current_thread())
        if not self.started.is_set():
            self.started_at = time.monotonic()
            self.started.set()
            self.release.wait(self.hold_limit_s)
            self.released_at = time.monotonic()
        return output


async def test_bot_stays_responsive_while_the_model_is_generating(
    fake_discord: FakeDiscord, bot_factory: BotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, w = fake_discord, fake_discord.world
    fake.heartbeat_interval_ms = HEARTBEAT_MS
    slow = SlowStep(Seq2SeqRunner.step)
    monkeypatch.setattr(Seq2SeqRunner, "step", slow.method())
    await bot_factory()

    busy = await fake.mention(w.member, w.general, "hello there")
    assert await asyncio.to_thread(slow.started.wait, 15), "generation never started"
    assert slow.threads[0] is not threading.main_thread()

    # Another channel: the typing indicator shows up at once, even though its reply must wait.
    asked = time.monotonic()
    other = await fake.mention(w.carol, w.random, "do you have any pets")
    await fake.wait_for(lambda: fake.typing_calls(w.random), timeout=5, what="typing in #random")
    assert fake.typing_calls(w.random)[0].time - asked < 1.0

    # A slash command is answered at once too.
    interaction = await fake.slash(w.admin, w.thread, "stats")
    await fake.wait_response(interaction, timeout=5)
    assert interaction.response_times[0] - interaction.created < 1.0

    # Heartbeats keep their rhythm: wait for three more while the model is still busy.
    beats_before = len(fake.heartbeats)
    await fake.wait_for(lambda: len(fake.heartbeats) >= beats_before + 3, timeout=10, what="heartbeats")
    assert not slow.release.is_set() and slow.released_at is None, "all of this happened during generation"
    slow.release.set()

    assert (await fake.wait_reply(busy))["content"]
    assert (await fake.wait_reply(other))["content"]
    assert slow.released_at is not None and slow.started_at is not None
    assert slow.released_at - slow.started_at >= 1.0  # the window measured above was a real one

    times = [h.time for h in fake.heartbeats]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]  # the first beat is sent at once on HELLO
    assert gaps, "no heartbeats to measure"
    assert max(gaps) < HEARTBEAT_MS / 1000 + 0.5, f"late heartbeats: {gaps}"
    # (Not asserting on bot.latency: discord.py's keep-alive thread records the send time after the
    # loop has sent the beat, so under CPU load a fast ACK can be timed against the previous beat.)


async def test_bot_survives_reconnect_and_resume(harness: BotHarness) -> None:
    fake, w = harness.fake, harness.fake.world
    resumed = asyncio.Event()

    async def on_resumed() -> None:
        resumed.set()

    harness.bot.add_listener(on_resumed, "on_resumed")
    assert await fake.ask(w.member, w.general, "hello there")

    await fake.request_reconnect()
    # Sent right away: it reaches the old socket as the bot drops it, and is replayed on RESUME.
    message = await fake.mention(w.member, w.general, "what do you like to do for fun")
    reply = await fake.wait_reply(message)
    await asyncio.wait_for(resumed.wait(), 10)

    assert fake.identifies == 1 and fake.resumes == 1
    assert fake.connection_paths == ["/gateway", "/resume"]  # resumed on READY's resume_gateway_url
    assert [event for _, event in fake.replayed] == ["MESSAGE_CREATE"]  # the message missed while away
    # The conversation carried on across the resume: the reply saw the turns from before it.
    turns = await harness.history.get(Conversation(w.general.id, w.guild_id))
    assert turns[2:] == [Turn("user", "what do you like to do for fun", speaker="Bob"), Turn("bot", reply["content"])]
    assert reply["content"] == await harness.engine.reply(turns[:3])
    # Answered exactly once, and the bot still works after the resume.
    assert await fake.ask(w.carol, w.general, "do you have any pets")
    answered = [m["message_reference"]["message_id"] for m in fake.messages_by_bot(w.general)]
    assert answered.count(message["id"]) == 1
    assert len(answered) == 3


async def test_run_discord_explains_a_refused_message_content_intent(
    fake_discord: FakeDiscord, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fake_discord.privileged_intents = False
    settings = bot_settings(fake_discord, tiny_model_dir, tmp_path / "history.sqlite3")
    with pytest.raises(ExitCode, match="Message Content intent") as caught:
        await asyncio.wait_for(run_discord(settings), 60)
    assert "Developer Portal" in str(caught.value)
    assert fake_discord.refusals == [4014]


async def test_run_discord_explains_a_rejected_token(
    fake_discord: FakeDiscord, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = bot_settings(fake_discord, tiny_model_dir, tmp_path / "history.sqlite3", discord_token="not-the-token")
    with pytest.raises(ExitCode, match="Discord rejected the token"):
        await asyncio.wait_for(run_discord(settings), 60)
    assert [(c.path, c.status) for c in fake_discord.calls] == [("/users/@me", 401)]
    assert fake_discord.identifies == 0
