"""A bot with ENGINE_URL never imports torch or transformers, and stays small: `python -m bot --console`
run for real against a fake OpenAI server, with Python's import log (`-X importtime`) on."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import psutil

from tests.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[1]
# The bot's resident memory with a remote engine (about 80 MB here: discord.py, aiohttp, openai).
RSS_LIMIT_BYTES = 150 * 2**20
HEAVY = ("torch", "transformers", "huggingface_hub", "ray")


async def test_a_remote_bot_imports_no_model_libraries_and_stays_small(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        env = {**os.environ, "PYTHONPATH": str(REPO), "ENGINE_URL": fake.url, "LOG_LEVEL": "WARNING"}
        env.pop("MODEL_NAME", None)
        bot = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "importtime", "-m", "bot", "--console",
            cwd=tmp_path, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert bot.stdin is not None and bot.stdout is not None and bot.stderr is not None
        try:
            bot.stdin.write(b"hello\n")
            await bot.stdin.drain()
            said = b""
            while b"echo: hello" not in said:
                more = await asyncio.wait_for(bot.stdout.read(4096), 30)
                assert more, f"the console ended early: {said!r}"
                said += more
            rss = psutil.Process(bot.pid).memory_info().rss
            bot.stdin.close()
            errors = (await asyncio.wait_for(bot.stderr.read(), 30)).decode()
            assert await asyncio.wait_for(bot.wait(), 30) == 0
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in errors.splitlines() if "import time:" in line}
    assert "openai" in imported and "bot" in imported  # the import log is there
    assert not imported & set(HEAVY), f"imported {sorted(imported & set(HEAVY))}"
    assert fake.requests[0]["messages"][-1] == {"role": "user", "content": "hello"}
    assert rss < RSS_LIMIT_BYTES, f"{rss / 2**20:.0f} MB"


async def test_with_engine_url_model_name_is_not_checked(tmp_path: Path) -> None:
    """MODEL_NAME names a model the bot will not load: a path that does not exist is no error then."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "ENGINE_URL": "http://127.0.0.1:9", "MODEL_NAME": "./nowhere"}
    env.pop("DISCORD_TOKEN", None)
    bot = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, errors = await asyncio.wait_for(bot.communicate(), 60)
    assert bot.returncode == 2 and "DISCORD_TOKEN is not set" in errors.decode()  # the next check, not MODEL_NAME
