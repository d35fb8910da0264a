"""The soak's scale-out topology (`python -m tests.soak --topology scaled`, part of `make soak`).

The same people, bursts, counting and verdict as tests/soak.py, on the deployment that scales out:

  * two bot processes, each a real `python -m bot` (tests/e2e/processes.py points it at the fake
    Discord), SHARD_COUNT=2 with SHARD_IDS=0 in one and 1 in the other;
  * conversations on four servers, two on each shard (five channels each), and ten DMs, which
    Discord sends to shard 0 only;
  * one PostgreSQL (started here in a temp dir) holding the history of both (HISTORY_DB);
  * one Ray Serve app (`python -m bot.serve`, SERVE_REPLICAS=2) answering both (ENGINE_URL), on the
    same tiny random BlenderBot, greedy, 8 new tokens.

In the middle:
  * an engine replica is killed (SIGKILL to its process, found under the server's process tree by
    its Ray title) halfway through a burst. Ray Serve starts a new one; replies that were on the
    killed replica, or sent to it before Ray noticed, fail, and their people get the bot's error
    notice. Like every notice that asks to try again, those messages are sent again once the burst
    is answered. The error logs the bot writes for them ("the engine failed to answer") are expected
    then, and only then (from the kill until 30 s after the new replica runs), one per error notice
    at most; any other error line of either bot fails the soak.
  * the process running shard 0 (DMs and two servers) is restarted: SIGTERM with a burst in flight
    (SHUTDOWN_GRACE_SECONDS=0, so its replies are abandoned and their people told), then a new
    process on the same shard. What is said on shard 0 meanwhile is never delivered (Discord does
    not queue for an offline shard) and is sent again once it is back; shard 1 keeps answering.

The crossing check reads the shared PostgreSQL history. Everything started here (bots, the server
and its Ray processes, PostgreSQL) is stopped at the end, also when the run fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from tests.e2e.processes import BotProcess, launch
from tests.fake_discord import FakeDiscord
from tests.fake_discord.world import shard_of
from tests.postgres import running_server
from tests.serve_app import ServeProcess, replica_processes
from tests.soak import RESEND, Conv, Soak
from tests.tiny_model import build_tiny_model

SHARDS = 2
SERVERS_PER_SHARD, CHANNELS_PER_SERVER = 2, 5
RESTARTED_SHARD = 0  # it also gets the DMs
# What the bot logs when the engine could not answer (a bug in the engine would log a traceback instead).
ENGINE_FAILED = re.compile(r"the engine failed to answer in channel \d+: ")
_ERROR_LINE = re.compile(r"^\[([^]]+)\] \[(ERROR|CRITICAL)\s*\] (.*)$")  # the bot's plain log format
KILL_WINDOW_S = 30  # after the new replica runs, failures of requests sent before it are still the kill's

log = logging.getLogger("soak")


class ScaledSoak(Soak):
    def __init__(
        self, fake: FakeDiscord, model_dir: Path, workdir: Path, history_url: str, engine_url: str, *, total: int,
        seed: int, server: Any,
    ) -> None:  # fmt: skip
        super().__init__(fake, model_dir, workdir / "unused.sqlite3", total, seed)
        self.workdir = workdir
        self.model_dir = model_dir
        self.history_url = history_url
        self.engine_url = engine_url
        self.server = server  # the `python -m bot.serve` process
        self.bots: dict[int, BotProcess] = {}
        self.retired: list[BotProcess] = []  # stopped processes, whose logs still count
        self.starts = 0
        self.shard_online = dict.fromkeys(range(SHARDS), False)
        self.resent_notices: set[str] = set()
        self.killed_replica: tuple[int, float] | None = None  # pid, when (monotonic)
        self.killed_at = 0.0  # when, as wall-clock time (the bots' logs have that)
        self.replica_back_after: float | None = None
        self.rss_note = "sum over the two bot processes; the model runs in the Serve app"

    def make_conversations(self) -> list[Conv]:
        w = self.world
        convs = []
        for shard in range(SHARDS):
            for server in range(SERVERS_PER_SHARD):
                guild, general = w.add_guild(f"Soak {shard}.{server}", shard=(shard, SHARDS))
                channels = [general] + [
                    w.add_text_channel(f"soak-{i}", guild_id=guild.id) for i in range(1, CHANNELS_PER_SERVER)
                ]
                for i, channel in enumerate(channels):
                    convs.append(Conv(f"s{shard}g{server}c{i}", channel, shard=shard_of(guild.id, SHARDS)))
        return convs + [Conv(f"d{i:02d}", w.dm_with(p), p, shard=0) for i, p in enumerate(self.people)]

    def is_online(self, conv: Conv) -> bool:
        return self.shard_online[conv.shard]

    # ----- the bot processes --------------------------------------------------------------------

    async def start_shard(self, shard: int) -> None:
        self.starts += 1
        bot = await launch(
            self.fake,
            self.workdir / f"bot-shard{shard}-{self.starts}",
            self.model_dir,
            HISTORY_DB=self.history_url,
            ENGINE_URL=self.engine_url,
            SHARD_COUNT=str(SHARDS),
            SHARD_IDS=str(shard),
            HISTORY_TURNS="1000",  # keep every turn: the crossing check reads whole conversations
            SHUTDOWN_GRACE_SECONDS="0",  # abandon whatever is still in flight at once
            SAMPLING="false",
            MAX_NEW_TOKENS="8",
        )
        self.bots[shard] = bot
        await bot.wait_stderr("logged in as", timeout=180)
        self.shard_online[shard] = True

    async def start_bot(self) -> None:
        await asyncio.gather(*(self.start_shard(shard) for shard in range(SHARDS)))
        self.online = True

    async def stop_shard(self, shard: int) -> None:
        """SIGTERM, as a process manager would; the process finishes on its own (a hang fails the soak)."""
        bot = self.bots.pop(shard)
        self.shard_online[shard] = False
        bot.process.send_signal(signal.SIGTERM)
        code = await bot.finish(timeout=60)
        self.retired.append(bot)
        if code != 0:
            raise RuntimeError(f"the bot of shard {shard} exited with {code}:\n{bot.stderr[-3000:]}")

    async def stop_bot(self) -> None:
        for shard in list(self.bots):
            await self.stop_shard(shard)
        self.online = False

    async def kill_everything(self) -> None:
        for bot in self.bots.values():
            await bot.kill()

    def memory(self) -> int:
        total = 0
        for bot in self.bots.values():
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(bot.process.pid).memory_info().rss
        return total

    def sample_rss(self, label: str) -> None:
        self.compact()
        self.rss.append((label, self.memory()))

    # ----- the engine replica -------------------------------------------------------------------

    def kill_replica(self) -> None:
        replicas = replica_processes(self.server.pid)
        if len(replicas) != 2:
            raise RuntimeError(f"expected 2 engine replicas under bot.serve, found {len(replicas)}")
        victim = self.rng.choice(replicas)
        victim.kill()
        self.killed_replica = (victim.pid, time.monotonic())
        self.killed_at = time.time()

    async def wait_replica_back(self) -> None:
        """Until Ray Serve has a second replica running again (a new process), or 5 minutes."""
        assert self.killed_replica is not None
        pid, since = self.killed_replica

        def back() -> bool:
            live = [p for p in replica_processes(self.server.pid) if p.pid != pid]
            return len(live) == 2

        deadline = time.monotonic() + 300
        while not back():
            if time.monotonic() > deadline:
                raise RuntimeError("Ray Serve did not replace the killed replica within 300s")
            await asyncio.sleep(0.5)
        self.replica_back_after = time.monotonic() - since

    # ----- people -------------------------------------------------------------------------------

    async def resend_notices(self) -> None:
        """Those told to try again (busy, error, timeout, restarting) do; once per message told."""
        self.index()
        told = [
            a for a in self.order if a.replies and a.replies[0]["content"] in RESEND and a.id not in self.resent_notices
        ]
        for attempt in told:
            self.resent_notices.add(attempt.id)
            await self.say(attempt.conv, resend_of=attempt)

    async def run(self) -> None:
        started = time.monotonic()
        await self.start_bot()
        await self.burst(60)
        await self.wait_answers()
        self.sample_rss("warm (after the first burst)")

        kill_at, restart_at = self.total // 3, (2 * self.total) // 3
        killed = restarted = False
        while len(self.order) < self.total:
            size = min(self.rng.randint(40, 120), self.total - len(self.order))
            if not killed and len(self.order) >= kill_at:
                killed = True
                print(f"[{time.monotonic() - started:6.1f}s] engine replica killed in the middle of a burst")
                await self.burst(size, midway=self.kill_replica_async)
                await self.wait_replica_back()
                print(
                    f"[{time.monotonic() - started:6.1f}s] Ray Serve replaced it after {self.replica_back_after:.1f}s"
                )
            elif not restarted and len(self.order) >= restart_at:
                restarted = True
                await self.restart(started)
            else:
                await self.burst(size)
            await self.wait_answers(at_most=10)
            await self.resend_notices()
            self.compact()
        await self.wait_answers()
        await self.resend_notices()
        await self.wait_answers()
        for conv in self.convs:  # late duplicates would show up now
            await self.say(conv)
        await self.wait_answers()
        await self.settle()
        self.sample_rss("end")
        await self.stop_bot()
        self.compact()
        self.elapsed = time.monotonic() - started

    async def kill_replica_async(self) -> None:
        self.kill_replica()

    async def settle(self) -> None:
        """Until no REST call has come for 3 s: the last streamed replies are finished."""
        while True:
            last = max((c.time for c in self.fake.calls), default=0.0)
            if time.monotonic() - last > 3:
                return
            await asyncio.sleep(0.5)

    async def restart(self, started: float) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] shard {RESTARTED_SHARD}'s process: SIGTERM with a burst in flight")
        await self.wait_answers()
        own = [c for c in self.convs if c.shard == RESTARTED_SHARD]
        in_flight = [await self.say(conv) for conv in self.rng.sample(own, len(own))]
        await self.wait_in_progress(in_flight)
        self.index()
        self.restart_in_flight = len(in_flight)
        self.restart_in_flight_unanswered = sum(1 for a in in_flight if not a.replies)
        await self.stop_shard(RESTARTED_SHARD)
        self.index()
        # Shard 0 is down: what is said there reaches no session; shard 1 still answers.
        meanwhile = [await self.say(conv) for conv in self.rng.sample(self.convs, len(self.convs))]
        offline = [a for a in meanwhile if not a.delivered]
        print(
            f"[{time.monotonic() - started:6.1f}s] shard {RESTARTED_SHARD} down; {len(meanwhile)} messages sent "
            f"meanwhile, {len(offline)} of them on its conversations; starting it again"
        )
        await self.start_shard(RESTARTED_SHARD)
        self.sample_rss("after the restart")
        for attempt in offline:
            await self.say(attempt.conv, resend_of=attempt)
        await self.wait_answers()
        await self.resend_notices()
        await self.wait_answers()

    # ----- the verdict --------------------------------------------------------------------------

    def topology(self) -> str:
        channels = SHARDS * SERVERS_PER_SHARD * CHANNELS_PER_SERVER
        return (
            f"over {channels} channels on {SHARDS * SERVERS_PER_SHARD} servers and {len(self.people)} DMs; "
            f"{SHARDS} bot processes (one shard each), PostgreSQL, Ray Serve with 2 replicas"
        )

    def more_report(self) -> list[str]:
        lines = [f"bot processes           {self.starts} started, {len(self.retired)} stopped (each exit code 0)"]
        if self.killed_replica is not None:
            back = f"{self.replica_back_after:.1f}s" if self.replica_back_after is not None else "never"
            lines.append(
                f"engine replica killed   pid {self.killed_replica[0]}; Ray Serve had a new one running after {back}"
            )
        lines.append(f"engine errors logged    {len(self.engine_failures())} (expected: the killed replica's)")
        return lines

    def bot_logs(self) -> list[str]:
        return [bot.stderr for bot in [*self.retired, *self.bots.values()]]

    def logged_errors(self) -> list[tuple[float, str]]:
        """(when, what) of every error line in the bots' logs."""
        found = []
        for text in self.bot_logs():
            for line in text.splitlines():
                if m := _ERROR_LINE.match(line):
                    found.append((time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")), m.group(3)))
        return found

    def engine_failures(self) -> list[str]:
        return [e for _, e in self.logged_errors() if ENGINE_FAILED.search(e)]

    def error_logs(self) -> list[str]:
        """Every error line of the bots but engine failures while the replica was down (from the kill until
        KILL_WINDOW_S after its replacement ran), if no more of them than people told of an error."""
        from bot.chat import ERROR_TEXT

        errors = self.logged_errors()
        if self.killed_replica is not None:
            end = self.killed_at + (self.replica_back_after or 0.0) + KILL_WINDOW_S
            expected = [e for when, e in errors if ENGINE_FAILED.search(e) and self.killed_at - 1 <= when <= end]
            told = sum(1 for a in self.order if a.replies and a.replies[0]["content"] == ERROR_TEXT)
            if len(expected) <= told:
                errors = [(w, e) for w, e in errors if not (ENGINE_FAILED.search(e) and self.killed_at - 1 <= w <= end)]
        return [e for _, e in errors] + [f"(in this process) {e}" for e in self.watch.errors]

    def stored_turns(self) -> dict[str, list[tuple[str, str]]]:
        with psycopg.connect(self.history_url) as db:
            return {
                conv.marker: db.execute(
                    "SELECT role, text FROM turns WHERE channel_id = %s ORDER BY id", (conv.channel.id,)
                ).fetchall()
                for conv in self.convs
            }


async def run_scaled(total: int, seed: int) -> int:
    """Build the model, start PostgreSQL and the Serve app, run the soak; stop all of it, whatever happens.
    The logs (each bot process's, the Serve app's) are deleted after a pass and kept after a failure."""
    tmp = Path(tempfile.mkdtemp(prefix="soak-scaled-"))
    began = time.monotonic()
    status = 1
    try:
        print("building the tiny model ...")
        model_dir = build_tiny_model(tmp / "tiny-model")
        with running_server() as postgres:
            name = postgres.create_database()
            print("starting python -m bot.serve (2 replicas) ...")
            server = ServeProcess(
                model_dir,
                tmp / "serve",
                SERVE_REPLICAS="2",
                MIN_NEW_TOKENS="2",
                MAX_NEW_TOKENS="8",
                NUM_BEAMS="1",
            )
            await asyncio.to_thread(server.start)
            assert server.process is not None
            try:
                async with FakeDiscord() as fake:
                    soak = ScaledSoak(
                        fake, model_dir, tmp, postgres.url(name), server.url, total=total, seed=seed,
                        server=server.process,
                    )  # fmt: skip
                    root = logging.getLogger()
                    root.addHandler(soak.watch)
                    try:
                        await soak.run()
                    finally:
                        root.removeHandler(soak.watch)
                        await soak.kill_everything()
                    passed = soak.report()
            finally:
                code = await asyncio.to_thread(server.stop)  # raises if Ray left a process behind
            if code != 0:
                print(f"python -m bot.serve exited with {code}:\n{server.output[-3000:]}")
            status = 0 if passed and code == 0 else 1
            return status
    finally:
        print(f"wall time, starting and stopping everything included: {time.monotonic() - began:.0f}s")
        if status == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp / "tiny-model", ignore_errors=True)
            print(f"logs kept in {tmp} (bot-shard*/stderr.txt, serve/serve.log)")
