"""Soak: thousands of messages through the fake Discord, with a gateway reconnect and a bot restart.

Run with `make soak` (`python -m tests.soak`, then `python -m tests.soak --topology scaled`); pytest
does not collect it (no test functions, and the name does not match `test_*.py`). Options:
`--messages N` (default 2000), `--seed S`, `--topology single|scaled` (default single: what follows;
scaled: two sharded bot processes, PostgreSQL and the Ray Serve app, see tests/soak_scaled.py).

What it does. A fake Discord on loopback holds 20 text channels and 10 people, each with a DM: 30
conversations. The real bot runs in this process through `bot.client.run.run_discord` (the product's
own startup and graceful shutdown; SIGTERM is raised in-process to stop it), on the tiny random
Blenderbot (greedy, 8 new tokens) built at start. People write in bursts: a burst picks conversations
at random and sends one to three messages to each, interleaved; the next burst starts while the
last few replies of the previous one are still pending. Every message carries its conversation's
marker and a serial number, so its text is unique.

In the middle:
  * a gateway RECONNECT (op 7): the bot RESUMEs, and the fake replays what it sent meanwhile;
  * a bot restart: a burst is sent and, once the bot is working on all of it, SIGTERM with no
    grace, so replies still in flight are abandoned and their people told "I'm restarting";
    while the bot is down a burst is sent; then a new bot starts on the same history database.

What counts, and why it is honest. Discord does not queue messages for a bot that is offline: a new
session (IDENTIFY) starts from now, and what was said while no session was connected is never
delivered (only a RESUME of a live session replays missed events). So messages sent while the bot
is down are counted as "not delivered (bot offline)", must get no reply, and are sent again by
their people once the bot is back, as people do; likewise a message answered with a notice (the
restart notice, or busy/timeout) is sent again. The pass line is about delivered messages only:

  lost        a delivered message that got no answer at all
  duplicated  a message answered more than once, or an undelivered one answered
  crossed     an answer in the wrong channel, one that references no message, or a conversation
              whose stored history is not exactly its own messages, in order, each followed by the
              answer posted to it (the marker shows which conversation a stored turn came from)

It passes with zero of each, no error logs, no REST call Discord would refuse, and nothing posted
that could ping; it also reports replies, notices, RSS growth (psutil) and reply latency. Exit
status 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord.http
import psutil
import yarl
from discord.gateway import DiscordWebSocket

from bot.client.run import run_discord
from bot.core.outcomes import BUSY_TEXT, CLOSING_TEXT, EMPTY_REPLY_TEXT, ERROR_TEXT, TIMEOUT_TEXT
from tests.fake_discord import QUIET, FakeDiscord, bot_settings
from tests.fake_discord.world import Channel, Member, User
from tests.tiny_model import CORPUS, build_tiny_model

CHANNELS, PEOPLE = 20, 10
RESEND = {CLOSING_TEXT, BUSY_TEXT, TIMEOUT_TEXT, ERROR_TEXT}  # notices that ask the person to try again
NOT_STORED = RESEND | {EMPTY_REPLY_TEXT}

log = logging.getLogger("soak")


@dataclass
class Conv:
    marker: str
    channel: Channel
    person: User | None = None  # DMs: the one person on the other side
    shard: int = 0  # the shard Discord sends its messages to


@dataclass
class Attempt:
    id: str
    conv: Conv
    text: str  # what the model should see
    sent_at: float
    delivered: bool
    resend_of: str | None = None
    replies: list[dict[str, Any]] = field(default_factory=list)


class LogWatch(logging.Handler):
    """Collects error logs, and counts the bot's "logged in" and "stopping" lines."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.errors: list[str] = []
        self.logins = 0
        self.stops = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors.append(f"{record.name}: {message}")
        if record.name.startswith("bot.client") and message.startswith("logged in as"):
            self.logins += 1
        if record.name == "bot" and message.startswith("stopping:"):
            self.stops += 1


class Soak:
    def __init__(self, fake: FakeDiscord, model_dir: Path, db: Path, total: int, seed: int) -> None:
        self.fake = fake
        self.world = fake.world
        self.rng = random.Random(seed)
        self.total = total
        self.settings = bot_settings(
            fake,
            model_dir,
            db,
            num_beams=1,
            min_new_tokens=2,
            max_new_tokens=8,
            history_turns=1000,  # keep every turn: the crossing check reads whole conversations
            user_cooldown_seconds=0.0,
            shutdown_grace_seconds=0.0,  # abandon whatever is still in flight at once
        )
        self.watch = LogWatch()
        self.attempts: dict[str, Attempt] = {}
        self.order: list[Attempt] = []
        self.unreferenced: list[dict[str, Any]] = []
        self.replies_by_id: dict[str, dict[str, Any]] = {}  # bot message id -> the reply as last edited
        self.pending: set[str] = set()
        self.post_time: dict[str, float] = {}  # bot message id -> when its POST reached the fake
        self.rest_problems: list[str] = []
        self._indexed = self._edits_indexed = 0
        self.serial = 0
        self.runner: asyncio.Task[None] | None = None
        self.online = False
        self.process = psutil.Process()
        self.rss: list[tuple[str, int]] = []
        self.elapsed = 0.0
        self.restart_in_flight = self.restart_in_flight_unanswered = 0
        w = self.world
        self.people = []
        for i in range(PEOPLE):
            person = User(w.ids.next(), f"soaker{i:02d}", global_name=f"Soaker {i}")
            w.users[person.id] = person
            w.members[person.id] = Member(person, [])
            self.people.append(person)
        self.convs = self.make_conversations()

    def make_conversations(self) -> list[Conv]:
        """The channels people talk in (made after the people, so that new servers count them as members)."""
        w = self.world
        convs = [Conv(f"c{i:02d}", w.add_text_channel(f"soak-{i:02d}")) for i in range(CHANNELS)]
        return convs + [Conv(f"d{i:02d}", w.dm_with(p), p) for i, p in enumerate(self.people)]

    def is_online(self, conv: Conv) -> bool:
        """Whether a bot session receives what is said in `conv` now."""
        return self.online

    # ----- the bot ------------------------------------------------------------------------------

    async def start_bot(self) -> None:
        logins = self.watch.logins
        self.runner = asyncio.create_task(run_discord(self.settings))
        deadline = time.monotonic() + 120
        while self.watch.logins == logins:  # on_ready comes after a quiet wait for guilds: poll the log
            if self.runner.done():
                self.runner.result()
                raise RuntimeError("run_discord returned before logging in")
            if time.monotonic() > deadline:
                raise RuntimeError("the bot did not log in within 120s")
            await asyncio.sleep(0.05)
        self.online = True

    async def stop_bot(self) -> None:
        """SIGTERM, handled by run_discord as in production; returns once it has returned."""
        assert self.runner is not None
        signal.raise_signal(signal.SIGTERM)
        await asyncio.wait_for(self.runner, 60)
        self.online = False

    # ----- people -------------------------------------------------------------------------------

    async def say(self, conv: Conv, resend_of: Attempt | None = None) -> Attempt:
        self.serial += 1
        words = self.rng.choice(CORPUS).split()
        text = f"{conv.marker} n{self.serial:05d} " + " ".join(words[: self.rng.randint(2, len(words))])
        author = conv.person or self.rng.choice(self.people)
        content = text if conv.person else f"{self.world.bot_user.mention} {text}"
        delivered = self.is_online(conv)
        message = await self.fake.send(author, conv.channel, content)
        attempt = Attempt(message["id"], conv, text, time.monotonic(), delivered, resend_of.id if resend_of else None)
        self.attempts[attempt.id] = attempt
        self.order.append(attempt)
        if delivered:
            self.pending.add(attempt.id)
        return attempt

    async def burst(self, size: int, *, midway: Any = None) -> list[Attempt]:
        """About `size` messages: 1 to 3 to each of a random set of conversations, interleaved."""
        plan: list[Conv] = []
        while len(plan) < size:
            plan += [self.rng.choice(self.convs)] * self.rng.randint(1, 3)
        self.rng.shuffle(plan)  # messages to one conversation keep their relative order: they are equal
        sent = []
        for index, conv in enumerate(plan[:size]):
            if midway is not None and index == size // 2:
                await midway()
            sent.append(await self.say(conv))
        return sent

    # ----- watching -----------------------------------------------------------------------------

    def index(self) -> None:
        """Take in the bot's new posts and edits (cheap: called after every event while waiting).

        A streamed reply is posted with its first words and edited as it grows: its edits update it.
        """
        posts = self.fake.bot_messages
        while self._indexed < len(posts):
            posted = posts[self._indexed]
            self._indexed += 1
            ref = (posted.get("message_reference") or {}).get("message_id")
            attempt = self.attempts.get(ref) if ref else None
            small = {k: posted[k] for k in ("id", "channel_id", "content")}
            self.replies_by_id[small["id"]] = small
            if attempt is None:
                self.unreferenced.append(small)
                continue
            attempt.replies.append(small)
            self.pending.discard(attempt.id)
        edits = self.fake.bot_edits
        while self._edits_indexed < len(edits):
            edit = edits[self._edits_indexed]
            self._edits_indexed += 1
            if edit["id"] in self.replies_by_id:
                self.replies_by_id[edit["id"]]["content"] = edit["content"]

    def compact(self) -> None:
        """Drop the fake's bookkeeping once it has been read, so RSS measures the bot, not the fake.

        Completed REST calls are checked (status, allowed_mentions) and timed, then dropped; the
        bot's posts and edits are indexed, then dropped; answered messages leave the channels
        (nothing will reference them again), and so do the bot's own after a minute (a streamed reply
        is edited until it is finished); each gateway session's replay log keeps its last 500 events
        (a RESUME replays only the few the bot missed).
        """
        fake = self.fake
        self.index()
        del fake.bot_messages[: self._indexed]
        del fake.bot_edits[: self._edits_indexed]
        self._indexed = self._edits_indexed = 0
        keep = []
        for call in fake.calls:
            if call.status == 0:
                keep.append(call)  # still in progress
                continue
            if call.status >= 400:
                self.rest_problems.append(f"{call.method} {call.path} -> {call.status} {call.response}")
            if call.method == "POST" and call.path.endswith("/messages"):
                mentions = (call.json or {}).get("allowed_mentions")
                if mentions != QUIET:
                    self.rest_problems.append(f"posted with allowed_mentions={mentions!r}")
                if call.status == 200 and isinstance(call.response, dict):
                    self.post_time[call.response["id"]] = call.time
        fake.calls[:] = keep
        fake.gateway_log.clear()
        fake.heartbeats.clear()
        recent = time.monotonic() - 60
        for conv in self.convs:
            messages = conv.channel.messages
            for mid in [m for m in messages if str(m) not in self.pending and self.post_time.get(str(m), 0) < recent]:
                del messages[mid]
        for session in fake.gateway.sessions.values():
            if len(session.log) > 500:
                del session.log[:-500]

    async def wait_answers(self, at_most: int = 0, timeout: float = 120.0) -> None:
        def settled() -> bool:
            self.index()
            return len(self.pending) <= at_most

        try:
            await self.fake.wait_for(settled, timeout=timeout, what=f"answers ({len(self.pending)} pending)")
        except AssertionError as exc:
            log.warning("%s", exc)

    async def wait_in_progress(self, attempts: list[Attempt]) -> None:
        """Wait until the bot has started on every one of `attempts` (its typing indicator, or an answer)."""
        since = min(a.sent_at for a in attempts)
        channels = {a.conv.channel.id for a in attempts}

        def started() -> bool:
            self.index()
            typing = {
                int(c.path.split("/")[2])
                for c in self.fake.calls_to("POST", r"/channels/\d+/typing")
                if c.time >= since
            }
            return channels <= typing

        await self.fake.wait_for(started, timeout=60, what="the bot to start on the whole burst")

    def sample_rss(self, label: str) -> None:
        self.compact()
        gc.collect()
        self.rss.append((label, self.process.memory_info().rss))

    # ----- the run ------------------------------------------------------------------------------

    async def run(self) -> None:
        started = time.monotonic()
        await self.start_bot()
        await self.burst(60)
        await self.wait_answers()
        self.sample_rss("warm (after the first burst)")

        reconnect_at, restart_at = self.total // 3, (2 * self.total) // 3
        reconnected = restarted = False
        while len(self.order) < self.total:
            size = min(self.rng.randint(40, 120), self.total - len(self.order))
            if not reconnected and len(self.order) >= reconnect_at:
                reconnected = True
                print(f"[{time.monotonic() - started:6.1f}s] gateway RECONNECT (op 7) in the middle of a burst")
                await self.burst(size, midway=self.fake.request_reconnect)
                await self.fake.wait_for(lambda: self.fake.resumes >= 1, timeout=30, what="RESUME")
            elif not restarted and len(self.order) >= restart_at:
                restarted = True
                await self.restart(started)
            else:
                await self.burst(size)
            await self.wait_answers(at_most=10)
            self.compact()
        await self.wait_answers()
        # Late duplicates would show up now: one last message in every conversation, all answered.
        for conv in self.convs:
            await self.say(conv)
        await self.wait_answers()
        self.sample_rss("end")
        await self.stop_bot()
        self.compact()
        self.elapsed = time.monotonic() - started

    async def restart(self, started: float) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] bot restart: SIGTERM with a burst in flight")
        await self.wait_answers()
        in_flight = [await self.say(conv) for conv in self.rng.sample(self.convs, len(self.convs))]
        await self.wait_in_progress(in_flight)
        self.index()
        self.restart_in_flight = len(in_flight)
        self.restart_in_flight_unanswered = sum(1 for a in in_flight if not a.replies)
        await self.stop_bot()
        self.index()
        # Down: what people say now reaches no session.
        offline = [await self.say(conv) for conv in self.rng.sample(self.convs, len(self.convs))]
        print(f"[{time.monotonic() - started:6.1f}s] bot down; {len(offline)} messages sent meanwhile; starting again")
        await self.start_bot()
        self.sample_rss("after the restart")
        # People whose message never arrived, or who were told to ask again, ask again.
        again = offline + [a for a in in_flight if a.replies and a.replies[0]["content"] in RESEND]
        for attempt in again:
            await self.say(attempt.conv, resend_of=attempt)
        await self.wait_answers()

    # ----- the verdict --------------------------------------------------------------------------

    def report(self) -> bool:
        fake = self.fake
        delivered = [a for a in self.order if a.delivered]
        undelivered = [a for a in self.order if not a.delivered]
        lost = [a for a in delivered if not a.replies]
        duplicated = [a for a in self.order if len(a.replies) > 1] + [a for a in undelivered if a.replies]
        crossed: list[str] = [
            f"unreferenced post {p['id']} in {p['channel_id']}: {p['content'][:40]!r}" for p in self.unreferenced
        ]
        for a in self.order:
            for r in a.replies:
                if r["channel_id"] != str(a.conv.channel.id):
                    crossed.append(f"reply to {a.id} ({a.conv.marker}) posted in channel {r['channel_id']}")
        crossed += self.check_history()
        answered = [a for a in delivered if a.replies]
        texts = [a.replies[0]["content"] for a in answered]
        notices = {
            name: texts.count(text)
            for name, text in (
                ("restart", CLOSING_TEXT),
                ("busy", BUSY_TEXT),
                ("timeout", TIMEOUT_TEXT),
                ("error", ERROR_TEXT),
                ("empty", EMPTY_REPLY_TEXT),
            )
        }
        resent = [a for a in self.order if a.resend_of]
        unresolved = [a for a in resent if not a.replies or a.replies[0]["content"] in RESEND]

        latencies = sorted(
            self.post_time[a.replies[0]["id"]] - a.sent_at for a in answered if a.replies[0]["id"] in self.post_time
        )

        problems = [f"error log {e}" for e in self.error_logs()]
        problems += self.rest_problems
        problems += [f"resent message {a.id} still unanswered" for a in unresolved]

        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

        mb = 1024 * 1024
        rss = dict(self.rss)
        warm, end = self.rss[0][1], self.rss[-1][1]
        print()
        print("=" * 72)
        print(f"soak: {len(self.order)} messages in {self.elapsed:.0f}s {self.topology()}")
        print(f"  sent                    {len(self.order)}")
        print(f"  delivered to the bot    {len(delivered)}")
        print(f"  not delivered (offline) {len(undelivered)}  (bot down; sent again once it was back)")
        print(f"  resent                  {len(resent)}  (offline ones, and those told to ask again)")
        print(f"  answered                {len(answered)}")
        print(f"    model replies         {len(answered) - sum(notices.values())}")
        print("    notices               " + ", ".join(f"{k} {v}" for k, v in notices.items()))
        print(f"  bot posts               {sum(len(a.replies) for a in self.order) + len(self.unreferenced)}")
        print(
            f"  gateway                 identifies {fake.identifies}, resumes {fake.resumes}, "
            f"events replayed on resume {len(fake.replayed)}"
        )
        print(
            f"  restart                 {self.restart_in_flight} in flight at SIGTERM, "
            f"{self.restart_in_flight_unanswered} of them not yet answered then"
        )
        for line in self.more_report():
            print(f"  {line}")
        print(
            f"  latency (send to post)  p50 {pct(0.50) * 1000:.0f} ms, p95 {pct(0.95) * 1000:.0f} ms, "
            f"max {latencies[-1] * 1000 if latencies else float('nan'):.0f} ms"
        )
        print("  RSS                     " + ", ".join(f"{k}: {v / mb:.0f} MiB" for k, v in rss.items()))
        print(f"  RSS growth              {(end - warm) / mb:+.1f} MiB from warm to end ({self.rss_note})")
        print(f"  LOST                    {len(lost)}")
        print(f"  DUPLICATED              {len(duplicated)}")
        print(f"  CROSSED                 {len(crossed)}")
        print(f"  other problems          {len(problems)}")
        for line in (
            [f"lost: {a.id} {a.conv.marker} {a.text!r}" for a in lost[:5]]
            + [f"duplicated: {a.id} {a.conv.marker} x{len(a.replies)}" for a in duplicated[:5]]
            + crossed[:5]
            + problems[:10]
        ):
            print(f"    {line}")
        passed = not lost and not duplicated and not crossed and not problems
        print(
            f"RESULT: {'PASS' if passed else 'FAIL'} (lost {len(lost)}, duplicated {len(duplicated)}, "
            f"crossed {len(crossed)}, other problems {len(problems)})"
        )
        print("=" * 72)
        return passed

    rss_note = "the fake's records dropped as read; includes a second model load"

    def topology(self) -> str:
        return f"over {CHANNELS} channels and {PEOPLE} DMs"

    def more_report(self) -> list[str]:
        """Lines of the summary that only some topologies have."""
        return []

    def error_logs(self) -> list[str]:
        return self.watch.errors

    def stored_turns(self) -> dict[str, list[tuple[str, str]]]:
        """Each conversation's stored (role, text) turns, oldest first, by marker."""
        with sqlite3.connect(self.settings.history_db) as db:
            return {
                conv.marker: db.execute(
                    "SELECT role, text FROM turns WHERE channel_id = ? ORDER BY id", (conv.channel.id,)
                ).fetchall()
                for conv in self.convs
            }

    def check_history(self) -> list[str]:
        """Each conversation's stored turns must be its own answered messages, in order, each with its answer."""
        found: list[str] = []
        stored = self.stored_turns()
        for conv in self.convs:
            rows = stored[conv.marker]
            expected: list[tuple[str, str]] = []
            for a in self.order:
                if a.conv is conv and a.replies and a.replies[0]["content"] not in NOT_STORED:
                    expected += [("user", a.text), ("bot", a.replies[0]["content"])]
            if rows != expected:
                strays = [t for r, t in rows if r == "user" and not t.startswith(conv.marker + " ")]
                diff = next((i for i, (r, e) in enumerate(zip(rows, expected, strict=False)) if r != e), None)
                first = (
                    f"; first difference at turn {diff}: stored {rows[diff]!r}, expected {expected[diff]!r}"
                    if diff is not None
                    else ""
                )
                found.append(
                    f"history of {conv.marker}: {len(rows)} turns stored, {len(expected)} expected, "
                    f"{len(strays)} from other conversations{first}"
                )
        return found


async def main(total: int, seed: int, topology: str = "single") -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bot").setLevel(logging.INFO)
    logging.getLogger("discord.client").setLevel(logging.ERROR)  # "PyNaCl is not installed", each start
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if topology == "scaled":
        from tests.soak_scaled import run_scaled

        return await run_scaled(total, seed)
    import torch

    torch.set_num_threads(1)  # steady on small machines; the event loop needs a core too
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        print("building the tiny model ...")
        model_dir = build_tiny_model(Path(tmp) / "tiny-model")
        async with FakeDiscord() as fake:
            discord.http.Route.BASE = fake.api_base
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
            soak = Soak(fake, model_dir, Path(tmp) / "history.sqlite3", total, seed)
            root = logging.getLogger()
            root.addHandler(soak.watch)
            try:
                await soak.run()
            finally:
                root.removeHandler(soak.watch)
                if soak.runner is not None and not soak.runner.done():
                    soak.runner.cancel()
            return 0 if soak.report() else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="user messages to send (default 2000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--topology",
        choices=("single", "scaled"),
        default="single",
        help="single: one bot in this process on SQLite (default); scaled: two sharded bot processes, "
        "PostgreSQL and the Ray Serve app with 2 replicas",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.messages, args.seed, args.topology)))
