"""The history store, on both backends: SQLite (a file) and PostgreSQL (a server the tests start)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.core.types import Conversation, Turn
from bot.history import Epochs, HistoryError, HistoryStore, HistoryUnavailable, NewerSchema, open_store
from bot.history.sqlite import SCHEMA_VERSION, SQLiteHistoryStore

A = Conversation(channel_id=1, guild_id=100)
B = Conversation(channel_id=2, guild_id=100)
OTHER_GUILD = Conversation(channel_id=3, guild_id=200)
DM = Conversation(channel_id=4, guild_id=None)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What HISTORY_DB would say: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "h.sqlite3")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(database: str) -> AsyncIterator[HistoryStore]:
    s = await open_store(database, max_turns=4)
    yield s
    await s.close()


async def test_append_and_get_in_order(store: HistoryStore) -> None:
    assert await store.append(A, 7, Turn("user", "hi"), Turn("bot", "hello"))
    assert await store.get(A) == [Turn("user", "hi"), Turn("bot", "hello")]
    assert await store.get(B) == []


async def test_bounded_to_newest_turns_cut_in_steps(store: HistoryStore) -> None:
    """max_turns 4: a conversation grows to 6 turns, then is cut back to its newest 4 at once, so its
    oldest turn stays put for more than one message (the engine's prefix cache keeps matching)."""
    lengths, first = [], []
    for i in range(6):
        await store.append(A, 7, Turn("user", f"q{i}"), Turn("bot", f"a{i}"))
        turns = await store.get(A)
        lengths.append(len(turns))
        first.append(turns[0].text)
        assert [t.text for t in turns[-4:]] == [x for j in range(max(0, i - 1), i + 1) for x in (f"q{j}", f"a{j}")]
    assert lengths == [2, 4, 6, 4, 6, 4]
    assert first == ["q0", "q0", "q0", "q2", "q2", "q4"]
    assert await store.counts() == (1, 4)  # trimmed in the database too


async def test_reset_only_touches_one_conversation(store: HistoryStore) -> None:
    await store.append(A, 7, Turn("user", "a"), Turn("bot", "b"))
    await store.append(B, 7, Turn("user", "c"), Turn("bot", "d"))
    assert await store.reset(A) == 2
    assert await store.get(A) == [] and len(await store.get(B)) == 2


async def test_reset_guild_keeps_other_guilds_and_dms(store: HistoryStore) -> None:
    for conv in (A, B, OTHER_GUILD, DM):
        await store.append(conv, 7, Turn("user", "x"), Turn("bot", "y"))
    assert await store.reset_guild(100) == 4
    assert await store.get(A) == await store.get(B) == []
    assert len(await store.get(OTHER_GUILD)) == 2 and len(await store.get(DM)) == 2


async def test_forget_user_everywhere(store: HistoryStore) -> None:
    await store.append(A, 7, Turn("user", "mine"), Turn("bot", "to me"))
    await store.append(A, 8, Turn("user", "theirs"), Turn("bot", "to them"))
    await store.append(DM, 7, Turn("user", "dm"), Turn("bot", "dm reply"))
    assert await store.forget_user(7) == 4
    assert await store.get(A) == [Turn("user", "theirs"), Turn("bot", "to them")]
    assert await store.get(DM) == []


async def test_odd_text_stored_verbatim(store: HistoryStore) -> None:
    text = "zalgo z̷̢̛a̶l̸g̵o، עברית \u202e 🙂 '; DROP TABLE turns; -- %s %(x)s ?"
    await store.append(DM, 7, Turn("user", text, "Ünïcode 🙂"), Turn("bot", "ok"))
    assert (await store.get(DM))[0] == Turn("user", text, "Ünïcode 🙂")


async def test_speaker_round_trip(store: HistoryStore) -> None:
    await store.append(A, 7, Turn("user", "hi all", "Alice"), Turn("bot", "hello Alice"))
    await store.append(DM, 8, Turn("user", "just us"), Turn("bot", "sure"))
    assert await store.get(A) == [Turn("user", "hi all", "Alice"), Turn("bot", "hello Alice")]
    assert await store.get(DM) == [Turn("user", "just us"), Turn("bot", "sure")]


async def test_discord_sized_ids(store: HistoryStore) -> None:
    big = Conversation(channel_id=1_234_567_890_123_456_789, guild_id=987_654_321_098_765_432)
    await store.append(big, 2**62, Turn("user", "big"), Turn("bot", "ids"))
    assert len(await store.get(big)) == 2
    assert await store.forget_user(2**62) == 2


async def test_snapshot_reads_turns_and_epochs_together(store: HistoryStore) -> None:
    first = await store.snapshot(A, 7)
    assert first.turns == [] and first.epochs == Epochs(0, 0, 0)
    await store.append(A, 7, Turn("user", "q"), Turn("bot", "a"), expected=first.epochs)
    await store.reset(B)  # another channel: A's epochs stay
    assert await store.snapshot(A, 7) == type(first)([Turn("user", "q"), Turn("bot", "a")], Epochs(0, 0, 0))
    await store.reset(A)
    await store.reset_guild(100)
    await store.reset_guild(100)
    await store.forget_user(7)
    assert (await store.snapshot(A, 7)).epochs == Epochs(1, 2, 1)
    assert (await store.snapshot(DM, None)).epochs == Epochs(0, 0, 0)  # no server, no user: never cleared


async def clear_by(store: HistoryStore, clear: str) -> None:
    """Clear conversation A (in server 100, user 7 speaking) the way `clear` names."""
    await {
        "reset": lambda: store.reset(A),
        "reset_guild": lambda: store.reset_guild(100),
        "forget_user": lambda: store.forget_user(7),
    }[clear]()


@pytest.mark.parametrize("clear", ["reset", "reset_guild", "forget_user"])
async def test_append_refused_after_a_clear_it_did_not_see(store: HistoryStore, clear: str) -> None:
    seen = await store.snapshot(A, 7)
    await clear_by(store, clear)
    assert not await store.append(A, 7, Turn("user", "late"), Turn("bot", "reply"), expected=seen.epochs)
    assert await store.get(A) == []
    # Other people, channels and servers are not held back; a fresh snapshot stores again.
    assert await store.append(A, 8, Turn("user", "x"), expected=(await store.snapshot(A, 8)).epochs)
    assert await store.append(OTHER_GUILD, 7, Turn("user", "y"), expected=(await store.snapshot(OTHER_GUILD, 7)).epochs)
    assert await store.append(A, 7, Turn("user", "now"), expected=(await store.snapshot(A, 7)).epochs)


async def test_a_reset_holds_across_processes(database: str) -> None:
    """Two stores on one database, as two bot processes: B read its epochs before A's reset, so B's
    reply is not stored, and later replies are."""
    a = await open_store(database, max_turns=10)
    b = await open_store(database, max_turns=10)
    try:
        await b.append(A, 7, Turn("user", "before"), Turn("bot", "kept until the reset"))
        seen = await b.snapshot(A, 7)  # B starts generating a reply...
        assert await a.reset(A) == 2  # ...while A's moderator runs /reset
        assert not await b.append(A, 7, Turn("user", "during"), Turn("bot", "not kept"), expected=seen.epochs)
        assert await a.get(A) == [] and await b.get(A) == []
        seen = await a.snapshot(A, 8)
        await b.forget_user(8)
        assert not await a.append(A, 8, Turn("user", "mine"), expected=seen.epochs)
        seen = await b.snapshot(B, 9)
        assert await b.append(B, 9, Turn("user", "after"), expected=seen.epochs)
        assert await a.get(B) == [Turn("user", "after")]
    finally:
        await a.close()
        await b.close()


async def test_concurrent_appends_and_resets_keep_the_promise(database: str) -> None:
    """Many appends racing resets from another store: every append that reports success, made on
    epochs read after the last reset, is kept; none read before a reset survives it."""
    a = await open_store(database, max_turns=1000)
    b = await open_store(database, max_turns=1000)
    try:

        async def writer(n: int) -> tuple[int, bool]:
            seen = await a.snapshot(A, n)
            await asyncio.sleep(0)
            return n, await a.append(A, n, Turn("user", f"m{n}"), expected=seen.epochs)

        tasks = [asyncio.create_task(writer(n)) for n in range(30)]
        await asyncio.sleep(0)
        await b.reset(A)
        results = await asyncio.gather(*tasks)
        kept = {t.text for t in await b.get(A)}
        assert kept <= {f"m{n}" for n, ok in results if ok}  # nothing stored that was refused
        final = await b.snapshot(A, 1)
        assert await a.append(A, 1, Turn("user", "after"), expected=final.epochs)
    finally:
        await a.close()
        await b.close()


async def test_replace_last_reply_regenerates_only_the_newest_bot_turn(store: HistoryStore) -> None:
    await store.append(A, 7, Turn("user", "q1", "Bob"), Turn("bot", "a1"), Turn("user", "q2", "Bob"), Turn("bot", "a2"))
    seen = await store.snapshot(A, 7)
    assert not await store.replace_last_reply(A, 7, "a1", "new", expected=seen.epochs)  # not the newest turn
    assert await store.replace_last_reply(A, 7, "a2", "a2, again", expected=seen.epochs)
    assert await store.get(A) == [
        Turn("user", "q1", "Bob"),
        Turn("bot", "a1"),
        Turn("user", "q2", "Bob"),
        Turn("bot", "a2, again"),
    ]
    assert not await store.replace_last_reply(A, 7, "a2", "twice", expected=seen.epochs)  # it reads otherwise now
    await store.append(A, 7, Turn("user", "q3"))
    assert not await store.replace_last_reply(A, 7, "a2, again", "x", expected=seen.epochs)  # a user turn is newest
    assert (await store.get(A))[-2:] == [Turn("bot", "a2, again"), Turn("user", "q3")]


@pytest.mark.parametrize("clear", ["reset", "reset_guild", "forget_user"])
async def test_replace_last_reply_refused_after_a_clear(store: HistoryStore, clear: str) -> None:
    await store.append(A, 7, Turn("user", "q"), Turn("bot", "a"))
    seen = await store.snapshot(A, 7)
    await clear_by(store, clear)
    await store.append(A, 7, Turn("user", "q"), Turn("bot", "a"))  # the same words again, after the clear
    assert not await store.replace_last_reply(A, 7, "a", "regenerated", expected=seen.epochs)
    assert (await store.get(A))[-1] == Turn("bot", "a")


async def test_guild_settings_round_trip_and_removal(store: HistoryStore) -> None:
    assert await store.guild_settings(100) == []
    await store.set_guild_settings(100, [("block", 11, "")])
    await store.set_guild_settings(100, [("listen", 12, "5")])
    await store.set_guild_settings(100, [("listen", 12, "9")])  # replaced, not added
    await store.set_guild_settings(100, [("persona", 0, "Be kind \u00e9 '; DROP TABLE turns; --")])
    await store.set_guild_settings(200, [("block_user", 2**62, "")])
    assert await store.guild_settings(100) == [
        ("block", 11, ""),
        ("listen", 12, "9"),
        ("persona", 0, "Be kind \u00e9 '; DROP TABLE turns; --"),
    ]
    assert await store.set_guild_settings(100, [("block", 11, None)]) == 1
    assert await store.set_guild_settings(100, [("block", 11, None)]) == 0  # nothing left to delete
    await store.append(A, 7, Turn("user", "kept"))  # the history is another matter
    assert await store.delete_guild_settings(100) == 2
    assert await store.guild_settings(100) == []
    assert await store.guild_settings(200) == [("block_user", 2**62, "")]  # other servers keep theirs
    assert await store.get(A) == [Turn("user", "kept")]


async def test_guild_settings_change_all_or_none(store: HistoryStore) -> None:
    """/bot allow is a delete and an insert: a fault in the second leaves the first undone too."""
    await store.set_guild_settings(100, [("block", 11, "")])
    assert await store.set_guild_settings(100, [("block", 11, None), ("allow", 11, "")]) == 2
    assert await store.guild_settings(100) == [("allow", 11, "")]
    broken = [("allow", 11, None), (None, 12, "")]  # no kind: the database refuses the second row
    with pytest.raises(HistoryError):
        await store.set_guild_settings(100, broken)  # type: ignore[list-item]
    assert await store.guild_settings(100) == [("allow", 11, "")]


async def test_guild_settings_shared_by_two_stores(database: str) -> None:
    a = await open_store(database, max_turns=4)
    b = await open_store(database, max_turns=4)
    try:
        await a.set_guild_settings(100, [("persona", 0, "pirate")])
        assert await b.guild_settings(100) == [("persona", 0, "pirate")]
        await b.delete_guild_settings(100)
        assert await a.guild_settings(100) == []
    finally:
        await a.close()
        await b.close()


async def test_a_closed_store_refuses_calls(database: str) -> None:
    s = await open_store(database, max_turns=4)
    await s.close()
    with pytest.raises(HistoryError):
        await s.get(A)


# ----- SQLite only --------------------------------------------------------------------------------------


async def test_sqlite_survives_reopen_and_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    first = await open_store(path, max_turns=10)
    await first.append(A, 7, Turn("user", "remember me"), Turn("bot", "I will"))
    await first.reset(B)
    await first.close()
    second = await open_store(path, max_turns=10)
    assert [t.text for t in await second.get(A)] == ["remember me", "I will"]
    assert (await second.snapshot(B, None)).epochs.channel == 1  # epochs are kept too
    await second.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_sqlite_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(NewerSchema, match="newer version"):
        await open_store(path, max_turns=4)


@pytest.mark.parametrize(
    ("name", "says"),
    [("folder", "is a folder"), ("junk.txt", "is not an SQLite database")],
)
async def test_sqlite_unusable_path(tmp_path: Path, name: str, says: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "junk.txt").write_text("hello, I am not a database\n" * 200)
    with pytest.raises(HistoryUnavailable, match=says):
        await open_store(tmp_path / name, max_turns=4)


async def test_sqlite_work_runs_off_the_event_loop(tmp_path: Path) -> None:
    """A write waiting on another process's lock does not stop the event loop."""
    path = tmp_path / "h.sqlite3"
    store = await open_store(path, max_turns=4)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock, as another process could
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    writing = asyncio.create_task(store.append(A, 7, Turn("user", "waits")))
    await asyncio.sleep(0.3)
    assert not writing.done() and ticks >= 10
    other.execute("COMMIT")
    other.close()
    assert await writing
    ticker.cancel()
    await store.close()


WRITER = """
import asyncio, sys
from bot.history import open_store
from bot.core.types import Conversation, Turn
async def main():
    store = await open_store(sys.argv[1], max_turns=100000)
    i = 0
    while True:
        await store.append(Conversation(i % 3, 100), 7, Turn("user", f"q{i}"), Turn("bot", f"a{i}"))
        print(i, flush=True)  # acknowledged: the bot would post the reply only now
        i += 1
asyncio.run(main())
"""


def test_kill_9_loses_no_acknowledged_turn(database: str) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, database],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert writer.stdout is not None
        acknowledged = -1
        for line in writer.stdout:
            acknowledged = int(line)
            if acknowledged >= 200:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    if "://" not in database:
        db = sqlite3.connect(database)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()

    async def stored() -> set[str]:
        store = await open_store(database, max_turns=100000)
        texts = {t.text for c in range(3) for t in await store.get(Conversation(c, 100))}
        await store.close()
        return texts

    texts = asyncio.run(stored())
    assert acknowledged >= 200
    assert all(f"q{i}" in texts and f"a{i}" in texts for i in range(acknowledged + 1))


# The schema as version 1 of the bot wrote it, before `speaker`.
SCHEMA_V1 = """
CREATE TABLE turns (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id   INTEGER NOT NULL,
    guild_id     INTEGER,
    user_id      INTEGER,
    role         TEXT NOT NULL CHECK (role IN ('user', 'bot')),
    text         TEXT NOT NULL,
    created_at   REAL NOT NULL
);
CREATE INDEX turns_by_channel ON turns (channel_id, id);
CREATE INDEX turns_by_guild ON turns (guild_id);
CREATE INDEX turns_by_user ON turns (user_id);
PRAGMA user_version=1;
"""


async def test_sqlite_version_1_file_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V1)
    db.executemany(
        "INSERT INTO turns (channel_id, guild_id, user_id, role, text, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        [(1, 100, 7, "user", "old question", 1.0), (1, 100, 7, "bot", "old answer", 1.0)],
    )
    db.commit()
    db.close()

    store = await open_store(path, max_turns=10)
    assert await store.get(A) == [Turn("user", "old question"), Turn("bot", "old answer")]  # kept, with no speaker
    await store.append(A, 8, Turn("user", "new question", "Bob"), Turn("bot", "new answer"))
    assert (await store.get(A))[-2:] == [Turn("user", "new question", "Bob"), Turn("bot", "new answer")]
    assert await store.forget_user(7) == 2  # the old columns still work
    assert (await store.snapshot(A, 7)).epochs == Epochs(0, 0, 1)  # and the new table
    await store.close()

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert "speaker" in [row[1] for row in db.execute("PRAGMA table_info(turns)")]
    assert [row[1] for row in db.execute("PRAGMA table_info(epochs)")] == ["scope", "id", "epoch"]
    assert [row[1] for row in db.execute("PRAGMA table_info(guild_settings)")] == GUILD_SETTINGS_COLUMNS
    db.close()
    reopened = await open_store(path, max_turns=10)  # a migrated file opens as it is
    assert await reopened.get(A) == [Turn("user", "new question", "Bob"), Turn("bot", "new answer")]
    await reopened.close()


GUILD_SETTINGS_COLUMNS = ["guild_id", "kind", "target", "value"]


async def test_sqlite_version_3_file_migrated_in_place(tmp_path: Path) -> None:
    """A file of the schema before server settings (3): turns and epochs kept, `guild_settings` added."""
    path = tmp_path / "h.sqlite3"
    store = await open_store(path, max_turns=10)
    await store.append(A, 7, Turn("user", "q", "Alice"), Turn("bot", "a"))
    await store.reset(B)
    await store.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE guild_settings")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()

    store = await open_store(path, max_turns=10)
    assert await store.get(A) == [Turn("user", "q", "Alice"), Turn("bot", "a")]
    assert (await store.snapshot(B, None)).epochs.channel == 1
    assert await store.guild_settings(100) == []
    assert await store.set_guild_settings(100, [("persona", 0, "You are {server}'s pirate.")])
    await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    assert [row[1] for row in db.execute("PRAGMA table_info(guild_settings)")] == GUILD_SETTINGS_COLUMNS
    db.close()
    reopened = await open_store(path, max_turns=10)
    assert await reopened.guild_settings(100) == [("persona", 0, "You are {server}'s pirate.")]
    await reopened.close()


def test_sqlite_new_file_has_the_current_schema(tmp_path: Path) -> None:
    asyncio.run(SQLiteHistoryStore(tmp_path / "h.sqlite3", max_turns=4).close())
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [row[1] for row in db.execute("PRAGMA table_info(turns)")][-1] == "speaker"
    assert [row[1] for row in db.execute("PRAGMA table_info(epochs)")] == ["scope", "id", "epoch"]
    db.close()
