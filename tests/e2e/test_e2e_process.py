"""End to end: the real `python -m bot` process against a fake Discord on loopback.

Product code has no test switch, so the child process points discord.py at the fake before it runs
the `bot` package exactly as `python -m bot` would (Route.BASE for REST, the default gateway URL for
the websocket; everything else is unmodified). Settings come from the environment, as in production.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from bot.core.types import Turn
from bot.engine import Engine, EngineConfig
from tests.e2e.processes import launch
from tests.fake_discord import FakeDiscord


async def test_real_process_answers_and_stops_cleanly_on_sigterm(
    fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, one_torch_thread: None
) -> None:
    fake, w = fake_discord, fake_discord.world
    bot = await launch(fake, tmp_path, tiny_model_dir)
    try:
        await fake.wait_ready_session(timeout=120)
        reply = await fake.ask(w.member, w.general, "hello there", timeout=60)
        dm_reply = await fake.ask(w.carol, w.dm_with(w.carol), "hello there", timeout=60)
        bot.process.send_signal(signal.SIGTERM)
        code = await bot.finish(60)
    finally:
        await bot.kill()
    stderr = bot.stderr
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert fake.token not in stderr
    # It closed the gateway with a close frame rather than dropping the connection (discord.py's
    # Client.close() asks for 1000, but its own reader races it and 4000 is what goes out).
    assert len(fake.close_codes) == 1 and fake.close_codes[0] in (1000, 4000), fake.close_codes
    # Same model, same input, another process: the same reply.
    async with Engine(EngineConfig(model_name=str(tiny_model_dir), device="cpu", precision="fp32")) as engine:
        expected = await engine.reply([Turn("user", "hello there")])
    assert reply == dm_reply == expected
    assert (tmp_path / "history.sqlite3").exists()


async def test_real_process_finishes_a_reply_in_progress_on_sigterm(
    fake_discord: FakeDiscord, tmp_path: Path, long_model_dir: Path
) -> None:
    fake, w = fake_discord, fake_discord.world
    bot = await launch(fake, tmp_path, long_model_dir)
    try:
        await fake.wait_ready_session(timeout=120)
        message = await fake.mention(w.member, w.general, "hello there")
        # The typing indicator goes up just before the model starts its 1000 tokens: stop now.
        await fake.wait_for(lambda: fake.typing_calls(w.general), timeout=60, what="typing")
        bot.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await bot.finish(90)
    finally:
        await bot.kill()
    stderr = bot.stderr
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "finishing replies in progress" in stderr
    # The reply in progress was finished and posted, every piece of it, before the bot went away.
    pieces = fake.messages_by_bot(w.general)
    assert pieces and pieces[0]["message_reference"]["message_id"] == message["id"]
    assert len(pieces) >= 2 and sum(len(p["content"]) for p in pieces) > 2000
    assert all(call.status == 200 for call in fake.message_posts(w.general))
    assert fake.message_posts(w.general)[0].time > signalled  # it really was in progress


async def test_real_process_with_a_wrong_token_says_so_and_exits(
    fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path
) -> None:
    bot = await launch(fake_discord, tmp_path, tiny_model_dir, DISCORD_TOKEN="wrong-token")
    code = await bot.finish(120)
    stderr = bot.stderr
    assert code != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "Discord rejected the token" in line]
    assert len(lines) == 1, stderr
    assert "wrong-token" not in stderr  # never print the token
    assert [(c.path, c.status) for c in fake_discord.calls] == [("/users/@me", 401)]
    assert fake_discord.identifies == 0
    assert "loading " not in stderr, stderr  # reported before the model load started (the engine's first line)
