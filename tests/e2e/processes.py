"""Run the real `python -m bot` process against a fake Discord on loopback (helpers, not tests).

Product code has no test switch, so the child points discord.py at the fake before it runs the `bot`
package exactly as `python -m bot` would. `TEST_SLOW_STEP_S` (read only by this launcher, never by
the product) makes the model deliberately slow: every decoding step sleeps that long first, so a
reply can be caught in flight; the engine's own stopping criteria still run between steps.
`TEST_SLOW_LOAD_S` makes loading the model take that much longer, so a signal can arrive mid-load.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from tests.fake_discord import FakeDiscord

REPO = Path(__file__).resolve().parents[2]

LAUNCH = """\
import os, runpy, sys, time
import discord.gateway, discord.http, yarl
discord.http.Route.BASE = sys.argv[1] + "/api/v10"
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(sys.argv[2])
slow = float(os.environ.get("TEST_SLOW_STEP_S") or 0)
if slow:
    from bot.engine.seq2seq import Seq2SeqRunner
    original = Seq2SeqRunner.step
    def step(self, *args, **kwargs):
        time.sleep(slow)
        return original(self, *args, **kwargs)
    Seq2SeqRunner.step = step
slow_load = float(os.environ.get("TEST_SLOW_LOAD_S") or 0)
if slow_load:
    import transformers
    original_load = transformers.AutoTokenizer.from_pretrained
    def from_pretrained(*args, **kwargs):
        time.sleep(slow_load)
        return original_load(*args, **kwargs)
    transformers.AutoTokenizer.from_pretrained = from_pretrained
sys.argv = ["bot"]
runpy.run_module("bot", run_name="__main__", alter_sys=True)
"""


class BotProcess:
    """A running `python -m bot`; stdout and stderr go to files in `workdir`."""

    def __init__(self, process: asyncio.subprocess.Process, workdir: Path) -> None:
        self.process = process
        self.workdir = workdir

    @property
    def stdout(self) -> str:
        return (self.workdir / "stdout.txt").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.workdir / "stderr.txt").read_text(errors="replace")

    async def wait_stderr(self, text: str, timeout: float = 30.0) -> None:
        """Wait (polling the log file) until `text` shows up on stderr."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared on stderr:\n{self.stderr}")
            await asyncio.sleep(0.02)

    async def finish(self, timeout: float) -> int:
        """Wait for the process to exit; kill it (and fail) if it takes longer than `timeout`."""
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"the bot did not exit within {timeout}s:\n{self.stderr}") from None
        finally:
            await self.kill()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def launch(fake: FakeDiscord, workdir: Path, model_dir: Path, **env_overrides: str) -> BotProcess:
    """Start `python -m bot` (pointed at the fake) with its settings in the environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISCORD_", "MODEL_", "HISTORY_", "DEV_GUILD", "LOG_LEVEL", "TEST_"))
    }
    env.update(
        DISCORD_TOKEN=fake.token,
        MODEL_NAME=str(model_dir),
        HISTORY_DB=str(workdir / "history.sqlite3"),
        DEVICE="cpu",
        PRECISION="fp32",
        USER_COOLDOWN_SECONDS="0",
        LOG_LEVEL="INFO",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(env_overrides)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LAUNCH,
        fake.base_url,
        fake.gateway_url,
        cwd=workdir,  # no .env file here: settings come only from the environment above
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=(workdir / "stdout.txt").open("wb"),
        stderr=(workdir / "stderr.txt").open("wb"),
    )
    return BotProcess(process, workdir)
