"""The soak's scale-out topology (`python -m tests.soak --topology scaled`, part of `make soak`).

The same people, bursts, counting and verdict as tests/soak.py, on the deployment that scales out:

  * two bot processes, each a real `python -m bot` (tests/e2e/processes.py points it at the fake
    Discord), SHARD_COUNT=2 with SHARD_IDS=0 in one and 1 in the other;
  * conversations on four servers, two on each shard (five channels each), and ten DMs, which
    Discord sends to shard 0 only;
  * one PostgreSQL (started here in a temp dir) holding the history of both (HISTORY_DB);
  * one Ray Serve app (`python -m bot.serve`, SERVE_REPLICAS=2) answering both (ENGINE_URL), on the
    same tiny random BlenderBot, greedy, 8 new tokens.

Four faults, at a fifth, two, three and four fifths of the messages, one at a time:
  * an engine replica is killed (SIGKILL to its process, found under the server's process tree by
    its Ray title) halfway through a burst. Ray Serve starts a new one; replies that were on the
    killed replica, or sent to it before Ray noticed, fail, and their people get the bot's error
    notice.
  * PostgreSQL is restarted: `pg_ctl stop -m fast` (its sessions are ended), a 3 s pause, then
    `pg_ctl start` on the same data dir and port, while people keep writing (8 messages a second,
    from a second before the stop until 3 s after answers are back). A reply that could not read its
    history gets the error notice; one whose answer could not be stored is still posted (the bot says
    so in its log), and that answer alone may then be missing from the stored history.
  * the whole model server is killed: SIGKILL to `python -m bot.serve` and every Ray process under
    it (GCS, raylet, workers, replicas) at once, then a new `python -m bot.serve` on the same port,
    with people writing throughout as above. Meanwhile the bots cannot reach the engine: error
    notices.
  * the process running shard 0 (DMs and two servers) is restarted: SIGTERM with a burst in flight
    (SHUTDOWN_GRACE_SECONDS=0, so its replies are abandoned and their people told), then a new
    process on the same shard. What is said on shard 0 meanwhile is never delivered (Discord does
    not queue for an offline shard) and is sent again once it is back; shard 1 keeps answering.

Like every notice that asks to try again (and a streamed reply cut off), those messages are sent
again once the fault is over; each fault starts only once everything before it is answered. Notices
are expected only while a fault is in effect: from the moment it is injected until its service is
back (the new replica running, PostgreSQL or the server started again, the shard logged in) plus a
grace window (30 s for the replica, whose dead requests Ray may still be routing; 10 s for the
others), and are put down to the latest fault whose window holds them. A notice posted outside every
window fails the soak, as does any error line of either bot but the ones a fault explains, inside
its window: "the engine failed to answer" for the replica and the server, no more of them than those
two gave error notices (or cut-off replies); "could not read the history" for PostgreSQL, no more
than it gave error notices; and "could not store a reply" for PostgreSQL, the only reason an answer
posted in its window may be missing from the stored history (one per such line in that channel).
For each fault the summary says when it came, when its service was back, when answers came back
(the first model reply to a message sent after it took effect) and the notices it caused, by kind.

The crossing check reads the shared PostgreSQL history. Everything started here (bots, the server
and its Ray processes, PostgreSQL) is stopped at the end, also when the run fails; then no process
may be left whose working directory is one of the soak's (every Ray process of the server runs in
its folder, PostgreSQL's in its data dir), else the soak fails and kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg

from bot.client.streaming import CUT_OFF_NOTE
from bot.core.outcomes import BUSY_TEXT, CLOSING_TEXT, EMPTY_REPLY_TEXT, ERROR_TEXT, TIMEOUT_TEXT
from tests.e2e.processes import BotProcess, launch
from tests.fake_discord import FakeDiscord
from tests.fake_discord.world import shard_of
from tests.postgres import PostgresServer, running_server, start_again, stop_fast
from tests.serve_app import ServeProcess, replica_processes
from tests.soak import RESEND, Attempt, Conv, Soak
from tests.tiny_model import build_tiny_model

SHARDS = 2
SERVERS_PER_SHARD, CHANNELS_PER_SERVER = 2, 5
RESTARTED_SHARD = 0  # it also gets the DMs
# What the bot logs when the engine could not answer (a bug in the engine would log a traceback instead).
ENGINE_FAILED = re.compile(r"the engine failed to answer in channel \d+: ")
# What it logs when the history could not be read (the person gets the error notice) or a reply not stored.
HISTORY_READ_FAILED = re.compile(r"could not read the history of channel \d+$")
HISTORY_WRITE_FAILED = re.compile(r"could not store a reply in channel (\d+)$")
_ERROR_LINE = re.compile(r"^\[([^]]+)\] \[(ERROR|CRITICAL)\s*\] (.*)$")  # the bot's plain log format
KILL_WINDOW_S = 30  # after the new replica runs, failures of requests sent before it are still the kill's
GRACE_S = 10  # after PostgreSQL, the server or the shard is back, notices are still the fault's this long
PG_PAUSE_S = 3.0  # PostgreSQL stays down this long
TRICKLE_PER_S = 8  # messages a second while PostgreSQL or the server is restarted
LEAD_S, TRAIL_S = 1.0, 3.0  # people write this long before the fault, and after answers are back
ANSWERS_BACK_TIMEOUT_S = 120
# The bot's notices, by kind; a streamed reply cut off ends with CUT_OFF_NOTE.
NOTICES = {
    CLOSING_TEXT: "restart",
    BUSY_TEXT: "busy",
    TIMEOUT_TEXT: "timeout",
    ERROR_TEXT: "error",
    EMPTY_REPLY_TEXT: "empty",
}

PAD = " " * 11  # under a fault's line in the summary

log = logging.getLogger("soak")


def notice_kind(content: str) -> str | None:
    """The kind of notice a reply is ("error", "cut off"...), or None for a model reply."""
    if content in NOTICES:
        return NOTICES[content]
    return "cut off" if content.endswith(CUT_OFF_NOTE) else None


def processes_in(*folders: Path) -> list[psutil.Process]:
    """Every process (but this one) whose working directory is one of `folders` or below, as ps lists them."""
    roots = [str(f) for f in folders]
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            cwd = process.cwd().removesuffix(" (deleted)")
        except psutil.Error:  # gone meanwhile, or a zombie
            continue
        if any(cwd == root or cwd.startswith(root + os.sep) for root in roots):
            found.append(process)
    return found


def describe(processes: list[psutil.Process]) -> str:
    names = []
    for process in processes:
        try:
            names.append(f"{process.pid} {' '.join(process.cmdline())[:80] or process.name()}")
        except psutil.Error:
            names.append(f"{process.pid} (gone)")
    return "; ".join(names)


@dataclass
class Fault:
    """One fault injected in the run; times are time.monotonic(), `*_wall` time.time() (the bots' logs)."""

    kind: str  # replica, postgres, server, restart
    what: str
    started: float
    started_wall: float
    grace: float
    shard: int | None = None  # only that shard's conversations are affected (None: all)
    down: float | None = None  # when it had taken effect (the server's processes gone, PostgreSQL stopped)
    restored: float | None = None  # when its service was back
    restored_wall: float | None = None
    detail: str = ""
    notices: Counter[str] = field(default_factory=Counter)
    last_notice: float | None = None  # when the last notice put down to it was posted

    def window(self) -> tuple[float, float]:
        """When its notices may be posted."""
        end = self.restored if self.restored is not None else math.inf
        return self.started, end + self.grace

    def wall_window(self) -> tuple[float, float]:
        """When its errors may be logged (the logs have whole seconds)."""
        end = self.restored_wall if self.restored_wall is not None else math.inf
        return self.started_wall - 1, end + self.grace + 1

    def back(self) -> None:
        self.restored, self.restored_wall = time.monotonic(), time.time()


# Error lines each kind of fault explains.
EXPECTED_ERRORS = {
    "replica": (ENGINE_FAILED,),
    "server": (ENGINE_FAILED,),
    "postgres": (HISTORY_READ_FAILED, HISTORY_WRITE_FAILED),
    "restart": (),
}


class ScaledSoak(Soak):
    def __init__(
        self, fake: FakeDiscord, model_dir: Path, workdir: Path, postgres: PostgresServer, history_url: str,
        serve: ServeProcess, *, total: int, seed: int,
    ) -> None:  # fmt: skip
        super().__init__(fake, model_dir, workdir / "unused.sqlite3", total, seed)
        self.workdir = workdir
        self.model_dir = model_dir
        self.postgres = postgres
        self.history_url = history_url
        self.serve = serve  # `python -m bot.serve`, killed and started again mid-run
        self.engine_url = serve.url
        self.bots: dict[int, BotProcess] = {}
        self.retired: list[BotProcess] = []  # stopped processes, whose logs still count
        self.starts = 0
        self.shard_online = dict.fromkeys(range(SHARDS), False)
        self.resent_notices: set[str] = set()
        self.killed_replica: int | None = None  # its pid
        self.faults: list[Fault] = []
        self.began = 0.0  # when the run started (monotonic)
        self.posted_at: dict[str, float] = {}  # bot message id -> when it was posted
        self.written_at: dict[str, float] = {}  # bot message id -> when it was last posted or edited
        # Filled in by analyse(), before the summary is printed:
        self.unexpected_notices: list[str] = []
        self.unstored: list[Attempt] = []  # answers posted but not stored while PostgreSQL was down
        self.history_problems: list[str] = []
        self.unexplained_errors: list[str] = []
        self.explained_errors: Counter[str] = Counter()
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

    def now(self) -> str:
        return f"[{time.monotonic() - self.began:6.1f}s]"

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

    # ----- watching -----------------------------------------------------------------------------

    def index(self) -> None:
        """As Soak.index, also noting when each of the bot's messages was posted and last edited."""
        for posted in self.fake.bot_messages[self._indexed :]:
            at = posted.get("posted_at", time.monotonic())
            self.posted_at[posted["id"]] = self.written_at[posted["id"]] = at
        for edit in self.fake.bot_edits[self._edits_indexed :]:
            self.written_at[edit["id"]] = edit["time"]
        super().index()

    def answers_back(self, fault: Fault) -> float | None:
        """When (seconds after the fault) the first model reply came to a message sent after it took effect."""
        since = fault.down if fault.down is not None else fault.started
        posted = [
            self.posted_at[a.replies[0]["id"]]
            for a in self.order
            if a.sent_at >= since
            and a.replies
            and (fault.shard is None or a.conv.shard == fault.shard)
            and notice_kind(a.replies[0]["content"]) is None
            and a.replies[0]["id"] in self.posted_at
        ]
        return min(posted) - fault.started if posted else None

    async def wait_answers_back(self, fault: Fault) -> None:
        deadline = time.monotonic() + ANSWERS_BACK_TIMEOUT_S
        while (back := self.answers_back(fault)) is None:
            if time.monotonic() > deadline:
                print(f"{self.now()} no model reply within {ANSWERS_BACK_TIMEOUT_S}s after {fault.what}")
                return
            await asyncio.sleep(0.2)
            self.index()
        print(f"{self.now()} answers back {back:.1f}s after the fault")

    @contextlib.asynccontextmanager
    async def trickle(self) -> AsyncIterator[None]:
        """People keep writing (TRICKLE_PER_S messages a second, to random conversations) inside the block."""
        stop = asyncio.Event()

        async def write() -> None:
            while not stop.is_set():
                await self.say(self.rng.choice(self.convs))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1 / TRICKLE_PER_S)

        writer = asyncio.create_task(write())
        try:
            yield
        finally:
            stop.set()
            await writer

    def begin(self, kind: str, what: str, *, grace: float = GRACE_S, shard: int | None = None) -> Fault:
        fault = Fault(kind, what, time.monotonic(), time.time(), grace, shard)
        self.faults.append(fault)
        return fault

    async def quiesce(self) -> None:
        """Every message answered, and those told to try again asked again and answered."""
        await self.wait_answers()
        await self.resend_notices()
        await self.wait_answers()

    # ----- the engine replica -------------------------------------------------------------------

    def server_pid(self) -> int:
        assert self.serve.process is not None
        return self.serve.process.pid

    def kill_replica(self) -> None:
        replicas = replica_processes(self.server_pid())
        if len(replicas) != 2:
            raise RuntimeError(f"expected 2 engine replicas under bot.serve, found {len(replicas)}")
        victim = self.rng.choice(replicas)
        fault = self.begin("replica", "engine replica killed", grace=KILL_WINDOW_S)
        victim.kill()
        fault.down = time.monotonic()
        self.killed_replica = victim.pid
        fault.detail = f"pid {victim.pid}"

    async def wait_replica_back(self) -> None:
        """Until Ray Serve has a second replica running again (a new process), or 5 minutes."""
        fault = self.faults[-1]

        def back() -> bool:
            live = [p for p in replica_processes(self.server_pid()) if p.pid != self.killed_replica]
            return len(live) == 2

        deadline = time.monotonic() + 300
        while not back():
            if time.monotonic() > deadline:
                raise RuntimeError("Ray Serve did not replace the killed replica within 300s")
            await asyncio.sleep(0.5)
        fault.back()
        assert fault.restored is not None
        print(f"{self.now()} Ray Serve replaced it after {fault.restored - fault.started:.1f}s")

    async def kill_replica_async(self) -> None:
        self.kill_replica()

    # ----- PostgreSQL ---------------------------------------------------------------------------

    async def restart_postgres(self) -> None:
        """pg_ctl stop -m fast, PG_PAUSE_S down, pg_ctl start on the same data dir and port; people keep writing."""
        await self.quiesce()
        async with self.trickle():
            await asyncio.sleep(LEAD_S)
            fault = self.begin("postgres", "PostgreSQL restarted")
            print(f"{self.now()} PostgreSQL: pg_ctl stop -m fast, messages arriving at {TRICKLE_PER_S}/s")
            await asyncio.to_thread(stop_fast, self.postgres)
            fault.down = time.monotonic()
            left = processes_in(self.postgres.data)
            if left:
                raise RuntimeError(f"PostgreSQL processes left after pg_ctl stop: {describe(left)}")
            print(f"{self.now()} PostgreSQL down (no process of it left); starting it again in {PG_PAUSE_S:g}s")
            await asyncio.sleep(PG_PAUSE_S)
            await asyncio.to_thread(start_again, self.postgres)
            fault.back()
            print(f"{self.now()} PostgreSQL running again (same data dir, port {self.postgres.port})")
            await self.wait_answers_back(fault)
            await asyncio.sleep(TRAIL_S)
        assert fault.down is not None
        fault.detail = f"pg_ctl stop took {fault.down - fault.started:.1f}s, down {PG_PAUSE_S:g}s"
        await self.quiesce()

    # ----- the whole model server ---------------------------------------------------------------

    def kill_server_tree(self) -> int:
        """SIGKILL `python -m bot.serve` and every process under it; returns how many, once all are gone."""
        process = self.serve.process
        assert process is not None
        root = psutil.Process(process.pid)
        victims = [root, *root.children(recursive=True)]
        killed: set[int] = set()
        for _ in range(5):
            for victim in victims:
                with contextlib.suppress(psutil.Error):
                    victim.kill()
                    killed.add(victim.pid)
            psutil.wait_procs(victims, timeout=15)
            process.wait(timeout=15)
            # Anything Ray started meanwhile (its processes all run in the server's folder) goes too.
            victims = processes_in(self.serve.workdir)
            if not victims:
                return len(killed)
        raise RuntimeError(f"processes of the killed model server are still running: {describe(victims)}")

    async def kill_server(self) -> None:
        """SIGKILL the model server and its Ray processes, start a new one on the same port; people keep writing."""
        await self.quiesce()
        async with self.trickle():
            await asyncio.sleep(LEAD_S)
            fault = self.begin("server", "model server killed")
            print(f"{self.now()} python -m bot.serve and its Ray processes: SIGKILL, messages arriving")
            killed = await asyncio.to_thread(self.kill_server_tree)
            fault.down = time.monotonic()
            print(f"{self.now()} {killed} processes killed, none left; starting python -m bot.serve again")
            await asyncio.to_thread(self.serve.start)
            fault.back()
            print(f"{self.now()} python -m bot.serve serving again at {self.serve.url}")
            await self.wait_answers_back(fault)
            await asyncio.sleep(TRAIL_S)
        assert fault.restored is not None
        fault.detail = f"{killed} processes SIGKILLed; serving again after {fault.restored - fault.started:.1f}s"
        await self.quiesce()

    # ----- people -------------------------------------------------------------------------------

    async def resend_notices(self) -> None:
        """Those told to try again (busy, error, timeout, restarting, cut off) do; once per message told."""
        self.index()
        told = [
            a
            for a in self.order
            if a.replies
            and (a.replies[0]["content"] in RESEND or a.replies[0]["content"].endswith(CUT_OFF_NOTE))
            and a.id not in self.resent_notices
        ]
        for attempt in told:
            self.resent_notices.add(attempt.id)
            await self.say(attempt.conv, resend_of=attempt)

    async def run(self) -> None:
        started = self.began = time.monotonic()
        await self.start_bot()
        await self.burst(60)
        await self.wait_answers()
        self.sample_rss("warm (after the first burst)")

        plan = [(self.total * i // 5, kind) for i, kind in enumerate(("replica", "postgres", "server", "restart"), 1)]
        while len(self.order) < self.total:
            size = min(self.rng.randint(40, 120), self.total - len(self.order))
            if plan and len(self.order) >= plan[0][0]:
                kind = plan.pop(0)[1]
                if kind == "replica":
                    print(f"{self.now()} engine replica killed in the middle of a burst")
                    await self.burst(size, midway=self.kill_replica_async)
                    await self.wait_replica_back()
                elif kind == "postgres":
                    await self.restart_postgres()
                elif kind == "server":
                    await self.kill_server()
                else:
                    await self.restart(started)
            else:
                await self.burst(size)
            await self.wait_answers(at_most=10)
            await self.resend_notices()
            self.compact()
        await self.quiesce()
        for conv in self.convs:  # late duplicates would show up now
            await self.say(conv)
        await self.wait_answers()
        await self.settle()
        self.sample_rss("end")
        await self.stop_bot()
        self.compact()
        self.elapsed = time.monotonic() - started

    async def settle(self) -> None:
        """Until no REST call has come for 3 s: the last streamed replies are finished."""
        while True:
            last = max((c.time for c in self.fake.calls), default=0.0)
            if time.monotonic() - last > 3:
                return
            await asyncio.sleep(0.5)

    async def restart(self, started: float) -> None:
        print(f"{self.now()} shard {RESTARTED_SHARD}'s process: SIGTERM with a burst in flight")
        await self.wait_answers()
        own = [c for c in self.convs if c.shard == RESTARTED_SHARD]
        in_flight = [await self.say(conv) for conv in self.rng.sample(own, len(own))]
        await self.wait_in_progress(in_flight)
        self.index()
        self.restart_in_flight = len(in_flight)
        self.restart_in_flight_unanswered = sum(1 for a in in_flight if not a.replies)
        fault = self.begin("restart", f"shard {RESTARTED_SHARD}'s bot process restarted", shard=RESTARTED_SHARD)
        await self.stop_shard(RESTARTED_SHARD)
        fault.down = time.monotonic()
        self.index()
        # Shard 0 is down: what is said there reaches no session; shard 1 still answers.
        meanwhile = [await self.say(conv) for conv in self.rng.sample(self.convs, len(self.convs))]
        offline = [a for a in meanwhile if not a.delivered]
        print(
            f"{self.now()} shard {RESTARTED_SHARD} down; {len(meanwhile)} messages sent "
            f"meanwhile, {len(offline)} of them on its conversations; starting it again"
        )
        await self.start_shard(RESTARTED_SHARD)
        fault.back()
        assert fault.restored is not None
        fault.detail = f"SIGTERM, {len(offline)} messages not delivered, logged in again"
        self.sample_rss("after the restart")
        for attempt in offline:
            await self.say(attempt.conv, resend_of=attempt)
        await self.quiesce()
        print(f"{self.now()} answers back {self.answers_back(fault) or math.nan:.1f}s after the SIGTERM")

    # ----- the verdict --------------------------------------------------------------------------

    def topology(self) -> str:
        channels = SHARDS * SERVERS_PER_SHARD * CHANNELS_PER_SERVER
        return (
            f"over {channels} channels on {SHARDS * SERVERS_PER_SHARD} servers and {len(self.people)} DMs; "
            f"{SHARDS} bot processes (one shard each), PostgreSQL, Ray Serve with 2 replicas"
        )

    def fault_at(self, when: float, kinds: tuple[str, ...] | None = None) -> Fault | None:
        """The fault whose notice window holds `when` (monotonic), if any: the latest one to start, since each
        starts only once everything before it was answered (a window's grace may reach into the next)."""
        for fault in reversed(self.faults):
            start, end = fault.window()
            if start <= when <= end and (kinds is None or fault.kind in kinds):
                return fault
        return None

    def report(self) -> bool:
        self.analyse()
        # Soak.report counts rest_problems among "other problems": notices outside every fault window too.
        self.rest_problems += self.unexpected_notices
        return super().report()

    def analyse(self) -> None:
        """Notices by fault (and those outside every window), error lines explained or not, and the history."""
        self.index()
        for a in self.order:
            kind = notice_kind(a.replies[0]["content"]) if a.replies else None
            if kind is None:
                continue
            when = self.written_at.get(a.replies[0]["id"], math.nan)
            fault = self.fault_at(when)
            if fault is None:
                self.unexpected_notices.append(
                    f"{kind} notice outside every fault window, at {when - self.began:.1f}s: {a.id} ({a.conv.marker})"
                )
                continue
            fault.notices[kind] += 1
            fault.last_notice = max(fault.last_notice or when, when)

        errors = self.logged_errors()
        unstored_budget: Counter[str] = Counter()  # channel id -> "could not store" lines inside a PostgreSQL window
        explained: dict[str, list[str]] = {"engine": [], "history read": [], "history write": []}
        unexplained = []
        for when, text in errors:
            kinds = [f.kind for f in self.faults if f.wall_window()[0] <= when <= f.wall_window()[1]]
            pattern = next((p for k in kinds for p in EXPECTED_ERRORS[k] if p.search(text)), None)
            if pattern is ENGINE_FAILED:
                explained["engine"].append(text)
            elif pattern is HISTORY_READ_FAILED:
                explained["history read"].append(text)
            elif pattern is HISTORY_WRITE_FAILED:
                explained["history write"].append(text)
                match = HISTORY_WRITE_FAILED.search(text)
                assert match is not None
                unstored_budget[match.group(1)] += 1
            else:
                unexplained.append(text)
        # No more of them than the faults gave notices: one error notice (or cut-off reply) per engine failure.
        told_engine = sum(
            f.notices["error"] + f.notices["cut off"] for f in self.faults if f.kind in ("replica", "server")
        )
        told_history = sum(f.notices["error"] for f in self.faults if f.kind == "postgres")
        if len(explained["engine"]) > told_engine:
            unexplained += explained.pop("engine")
        if len(explained["history read"]) > told_history:
            unexplained += explained.pop("history read")
        # An answer may be missing from the history only where such a line was logged (history_with_gaps).
        self.history_problems = self.history_with_gaps(unstored_budget)
        self.explained_errors = Counter({k: len(v) for k, v in explained.items()})
        self.unexplained_errors = unexplained + [f"(in this process) {e}" for e in self.watch.errors]

    def history_with_gaps(self, budget: Counter[str]) -> list[str]:
        """Each conversation's stored turns must be its own answered messages, in order, each with its answer;
        only an answer posted while PostgreSQL was down, in a channel where the bot logged "could not store a
        reply" for it, may be missing (`self.unstored`)."""
        found: list[str] = []
        stored = self.stored_turns()
        for conv in self.convs:
            rows = stored[conv.marker]
            answered = [
                a for a in self.order if a.conv is conv and a.replies and notice_kind(a.replies[0]["content"]) is None
            ]
            at, mismatch = 0, None
            skipped: list[Attempt] = []
            for a in answered:
                pair = [("user", a.text), ("bot", a.replies[0]["content"])]
                if rows[at : at + 2] == pair:
                    at += 2
                    continue
                when = self.written_at.get(a.replies[0]["id"], math.nan)
                if self.fault_at(when, ("postgres",)) and len(skipped) < budget[str(conv.channel.id)]:
                    skipped.append(a)
                    continue
                mismatch = f"turn {at}: stored {rows[at : at + 2]!r}, expected {pair!r}"
                break
            if mismatch is None and at < len(rows):
                mismatch = f"turn {at}: stored {rows[at]!r} after the last expected one"
            if mismatch is None:
                self.unstored += skipped
                continue
            strays = [t for r, t in rows if r == "user" and not t.startswith(conv.marker + " ")]
            found.append(
                f"history of {conv.marker}: {len(rows)} turns stored, {2 * len(answered)} expected, "
                f"{len(strays)} from other conversations; first difference at {mismatch}"
            )
        return found

    def check_history(self) -> list[str]:
        return self.history_problems

    def error_logs(self) -> list[str]:
        return self.unexplained_errors

    def more_report(self) -> list[str]:
        lines = [f"bot processes           {self.starts} started, {len(self.retired)} stopped (each exit code 0)"]
        lines.append("faults                  (s from the start; notices allowed until the service is back + grace)")
        for fault in self.faults:
            back = self.answers_back(fault)
            answers = f"{back:.1f}s" if back is not None else "never"
            end = fault.restored if fault.restored is not None else math.inf
            meanwhile = sum(1 for a in self.order if fault.started <= a.sent_at <= end)
            notices = ", ".join(f"{k} {n}" for k, n in sorted(fault.notices.items())) or "none"
            if fault.last_notice is not None:
                notices += f" (the last {fault.last_notice - fault.started:.1f}s after the fault)"
            lines += [
                f"  {fault.started - self.began:6.1f}s {fault.what} ({fault.detail})",
                f"{PAD}service back after {end - fault.started:.1f}s, answers back after {answers}",
                f"{PAD}{meanwhile} messages sent until the service was back",
                f"{PAD}notices: {notices}; window until {fault.grace:g}s after it was back",
            ]
        kinds = Counter(k for f in self.faults for k in f.notices.elements())
        lines.append(
            "notices by kind         " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")
            + f"; outside every fault window {len(self.unexpected_notices)}"
        )  # fmt: skip
        lines.append(
            f"answers not stored      {len(self.unstored)} (posted while PostgreSQL was down; the bot logged each)"
        )
        lines.append(
            "errors logged           "
            + ", ".join(f"{k} {n}" for k, n in self.explained_errors.items())
            + f" (explained by a fault); unexplained {len(self.unexplained_errors)}"
        )
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
    folders = [tmp]  # every process started here runs in one of these (PostgreSQL's data dir is added)
    try:
        print("building the tiny model ...")
        model_dir = build_tiny_model(tmp / "tiny-model")
        with running_server() as postgres:
            folders.append(postgres.root)
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
                        fake, model_dir, tmp, postgres, postgres.url(name), server, total=total, seed=seed,
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
    finally:
        # Also after a failure: nothing of the soak's may outlive it.
        left = processes_in(*folders)
        if left:
            print(f"left running after the soak (killed now): {describe(left)}")
            for process in left:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            status = 1
        else:
            print("left running after the soak: nothing (no bot, Ray or PostgreSQL process of it)")
        print(f"wall time, starting and stopping everything included: {time.monotonic() - began:.0f}s")
        if status == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp / "tiny-model", ignore_errors=True)
            print(f"logs kept in {tmp} (bot-shard*/stderr.txt, serve/serve.log)")
    return status
