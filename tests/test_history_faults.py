"""Database faults: SQLite on a full or read-only disk, PostgreSQL stopped and started again mid-conversation.

What `ChatService` relies on, checked on the store itself: every failure is `HistoryError`, soon (no
call hangs); a failed write leaves the database as it was (earlier turns intact, the failed ones
absent, the SQLite file passing `PRAGMA integrity_check`); and once the disk has room again, is
writable again or the server is back, the very next call on the same store object succeeds.

The real-disk variants mount a small tmpfs (root only; skipped, saying why, where mounting is not
permitted). Each has a variant that runs everywhere: a full disk through `PRAGMA max_page_count`
(SQLite's own SQLITE_FULL), a read-only disk by opening the file read-only (`mode=ro`), which is what
SQLite does by itself with a file on a disk it may not write.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bot.core.chat import ChatService
from bot.core.outcomes import ERROR_TEXT
from bot.core.types import Conversation, Reply, Turn
from bot.history import HistoryError, HistoryStore, open_store
from bot.history.sqlite import SQLiteHistoryStore
from tests.postgres import PostgresServer
from tests.scripted_engine import ScriptedEngine

C = Conversation(channel_id=1, guild_id=100)
ROOT = Path(__file__).resolve().parent.parent
REAL_CONNECT = sqlite3.connect


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` for the block; skips the test where it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir()
    try:
        result = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder))
    except OSError as exc:  # no mount(8)
        pytest.skip(f"cannot run mount: {exc}")
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def remount(folder: Path, mode: str) -> None:
    result = _mount("-o", f"remount,{mode}", str(folder))
    assert result.returncode == 0, result.stderr


def fill(folder: Path) -> Path:
    """A file taking every free byte of `folder`'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        while _wrote(f, b"\0" * 65536):
            pass
    return filler


def _wrote(f: Any, data: bytes) -> bool:
    """Whether `data` was written; False where the disk is full."""
    try:
        f.write(data)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return False
    return True


def integrity(path: Path) -> str:
    db = REAL_CONNECT(path)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


async def store_earlier_turns(store: HistoryStore) -> list[Turn]:
    earlier = [Turn("user", "first question", "Alice"), Turn("bot", "first answer")]
    earlier += [Turn("user", "second question", "Alice"), Turn("bot", "second answer")]
    assert await store.append(C, 7, *earlier[:2])
    assert await store.append(C, 7, *earlier[2:])
    return earlier


async def append_until_it_fails(store: SQLiteHistoryStore, tries: int = 400) -> tuple[list[Turn], HistoryError]:
    """Turns appended (acknowledged) before the first `HistoryError`, and that error."""
    acknowledged: list[Turn] = []
    for i in range(tries):
        turn = Turn("user", f"filling {i} " + "x" * 3000)
        try:
            await store.append(C, 7, turn)
        except HistoryError as exc:
            return acknowledged, exc
        acknowledged.append(turn)
    raise AssertionError(f"{tries} appends of 3 kB each and the disk is still not full")


async def check_full_then_freed(store: SQLiteHistoryStore, path: Path, free: Any) -> None:
    """The common part of the full-disk tests, once the store's disk or file is at its limit."""
    earlier = await store.get(C)
    acknowledged, error = await append_until_it_fails(store)
    assert "full" in str(error)
    with pytest.raises(HistoryError, match="full"):  # still full: every write fails, none is half-stored
        await store.append(C, 7, Turn("user", "refused " + "x" * 3000), Turn("bot", "refused too"))
    # Reading still works (the user gets a reply, it is just not remembered), and nothing was lost.
    assert (await store.snapshot(C, 7)).turns == earlier + acknowledged
    assert integrity(path) == "ok"

    free()
    assert await store.append(C, 7, Turn("user", "room again"), Turn("bot", "stored"))  # the same store
    assert await store.get(C) == [*earlier, *acknowledged, Turn("user", "room again"), Turn("bot", "stored")]
    await store.close()
    reopened = await open_store(path, max_turns=1000)
    assert await reopened.get(C) == [*earlier, *acknowledged, Turn("user", "room again"), Turn("bot", "stored")]
    await reopened.close()
    assert integrity(path) == "ok"


# ----- SQLite: a full disk ------------------------------------------------------------------------------


async def test_sqlite_on_a_full_tmpfs(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "2m") as disk:
        path = disk / "h.sqlite3"
        store = await SQLiteHistoryStore.open(path, max_turns=1000)
        try:
            await store_earlier_turns(store)
            filler = fill(disk)
            await check_full_then_freed(store, path, filler.unlink)
        finally:
            await store.close()


async def test_sqlite_at_its_max_page_count(tmp_path: Path) -> None:
    """The same through SQLite's own limit (SQLITE_FULL), with no mount: runs everywhere."""
    path = tmp_path / "h.sqlite3"
    store = await SQLiteHistoryStore.open(path, max_turns=1000)

    def limit(pages: int | None) -> None:
        def set_limit() -> None:
            current = int(store._db.execute("PRAGMA page_count").fetchone()[0])
            store._db.execute(f"PRAGMA max_page_count = {current + pages if pages is not None else 2**31}")

        store._worker.submit(set_limit).result()

    try:
        await store_earlier_turns(store)
        limit(3)  # room for a few more turns of 3 kB
        await check_full_then_freed(store, path, lambda: limit(None))
    finally:
        await store.close()


# ----- SQLite: a read-only disk -------------------------------------------------------------------------
#
# A running store never sees chmod or a read-only bind mount (its files are open already, and root
# ignores file modes), and Linux refuses to remount a filesystem read-only while a file on it is open
# for writing. The store meets a read-only disk when it opens the file while the disk is read-only: the
# bot starting again after a crash (its -wal and -shm files left behind, as `kill -9` leaves them) on a
# disk that came back read-only, as a kernel remounts one after disk errors. SQLite then opens the file
# read-only without a word, and a connection opened read-only stays read-only.

CRASHING_WRITER = """
import asyncio, os, sys
from bot.history import open_store
from bot.core.types import Conversation, Turn
async def main():
    store = await open_store(sys.argv[1], max_turns=1000)
    await store.append(Conversation(1, 100), 7, Turn("user", "first question", "Alice"), Turn("bot", "first answer"))
    await store.append(Conversation(1, 100), 7, Turn("user", "second question", "Alice"), Turn("bot", "second answer"))
    os._exit(0)  # as kill -9: no close, so the -wal and -shm files stay
asyncio.run(main())
"""

EARLIER = [
    Turn("user", "first question", "Alice"),
    Turn("bot", "first answer"),
    Turn("user", "second question", "Alice"),
    Turn("bot", "second answer"),
]


async def check_read_only_then_writable(store: SQLiteHistoryStore, path: Path, make_writable: Any) -> None:
    assert (await store.snapshot(C, 7)).turns == EARLIER  # the history is read: replies still use it
    for _ in range(2):  # and stays so while the disk is read-only (the store tries a new connection)
        with pytest.raises(HistoryError, match="readonly"):
            await store.append(C, 7, Turn("user", "not stored"), Turn("bot", "not stored either"))
        assert await store.get(C) == EARLIER
    make_writable()
    assert await store.append(C, 7, Turn("user", "writable again"), Turn("bot", "stored"))  # the same store
    assert await store.get(C) == [*EARLIER, Turn("user", "writable again"), Turn("bot", "stored")]
    assert await store.reset(Conversation(2, 100)) == 0  # every kind of write works again
    await store.close()
    assert integrity(path) == "ok"


async def test_sqlite_on_a_read_only_mount(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        path = disk / "h.sqlite3"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-c", CRASHING_WRITER, str(path)]
        await asyncio.to_thread(subprocess.run, command, env=env, check=True, timeout=60)
        assert (disk / "h.sqlite3-wal").exists() and (disk / "h.sqlite3-shm").exists()
        remount(disk, "ro")
        try:
            store = await SQLiteHistoryStore.open(path, max_turns=1000)
            try:
                await check_read_only_then_writable(store, path, lambda: remount(disk, "rw"))
            finally:
                await store.close()
        finally:
            remount(disk, "rw")


async def read_only_file(path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Store the earlier turns in `path`, then make the store's connections open it as SQLite opens a
    file it may not write (read-only, `mode=ro`) until the returned function is called."""
    writer = await SQLiteHistoryStore.open(path, max_turns=1000)
    await store_earlier_turns(writer)
    await writer.close()
    read_only = True

    def connect(database: str, **kwargs: Any) -> sqlite3.Connection:
        if read_only and database == str(path):
            return REAL_CONNECT(f"file:{quote(database)}?mode=ro", uri=True, **kwargs)
        return REAL_CONNECT(database, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)

    def make_writable() -> None:
        nonlocal read_only
        read_only = False

    return make_writable


async def test_sqlite_on_a_read_only_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with no mount, everywhere: while `read_only` is set, the store's connections open the
    file as SQLite opens one it may not write (read-only, `mode=ro`)."""
    path = tmp_path / "h.sqlite3"
    make_writable = await read_only_file(path, monkeypatch)
    store = await SQLiteHistoryStore.open(path, max_turns=1000)
    try:
        await check_read_only_then_writable(store, path, make_writable)
    finally:
        await store.close()


async def test_a_user_on_a_read_only_disk_gets_replies_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripted_engine: ScriptedEngine
) -> None:
    """Through `ChatService`: while the disk is read-only, answers still come (with the history read)
    and are not stored; once it is writable, the next one is, with no restart."""
    path = tmp_path / "h.sqlite3"
    make_writable = await read_only_file(path, monkeypatch)
    store = await SQLiteHistoryStore.open(path, max_turns=1000)
    chat = ChatService(scripted_engine, store)
    try:
        assert await chat.respond(C, 7, "while read-only", speaker="Alice") == Reply("re: while read-only")
        assert scripted_engine.seen[-1] == [*EARLIER, Turn("user", "while read-only", "Alice")]
        assert await store.get(C) == EARLIER  # posted, not remembered
        make_writable()
        assert await chat.respond(C, 7, "writable again", speaker="Alice") == Reply("re: writable again")
        assert await store.get(C) == [
            *EARLIER,
            Turn("user", "writable again", "Alice"),
            Turn("bot", "re: writable again"),
        ]
    finally:
        await store.close()


# ----- PostgreSQL: the server stopped and started again -------------------------------------------------


async def timed(call: Any) -> tuple[Any, float]:
    """What `call` returned (or the `HistoryError` it raised) and how many seconds it took."""
    start = time.monotonic()
    try:
        result = await call
    except HistoryError as exc:
        result = exc
    return result, time.monotonic() - start


async def test_postgres_stopped_and_started_again(
    postgres_server: PostgresServer, postgres_url: str, scripted_engine: ScriptedEngine
) -> None:
    """An administrator's restart (`pg_ctl stop -m fast`, then start) in the middle of a conversation.

    The outage lasts 20 s: long enough that a pool backing off as psycopg_pool does by default (its
    attempts at about 1, 3, 7, 15 and 31 s) would leave the returned server untried for seconds more.
    """
    store = await open_store(postgres_url, max_turns=1000)
    chat = ChatService(scripted_engine, store)
    try:
        earlier = await store_earlier_turns(store)
        await asyncio.to_thread(postgres_server.stop, "fast")
        stopped = time.monotonic()
        try:
            (snapshot, snapshot_s), (append, append_s), (notice, notice_s) = await asyncio.gather(
                timed(store.snapshot(C, 7)),
                timed(store.append(C, 7, Turn("user", "during"), Turn("bot", "lost"))),
                timed(chat.respond(C, 7, "anyone there?")),
            )
            assert isinstance(snapshot, HistoryError) and isinstance(append, HistoryError)
            assert notice == Reply(ERROR_TEXT, ok=False)  # the user is asked to try again
            assert max(snapshot_s, append_s, notice_s) < 8, (snapshot_s, append_s, notice_s)  # not a hang
            reset, reset_s = await timed(store.reset(Conversation(2, 100)))
            assert isinstance(reset, HistoryError) and reset_s < 8
            await asyncio.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
        finally:
            await asyncio.to_thread(postgres_server.start_again)

        # The very next calls, on the same store, succeed, and at once.
        snapshot, snapshot_s = await timed(store.snapshot(C, 7))
        assert not isinstance(snapshot, HistoryError), snapshot
        assert snapshot.turns == earlier and snapshot_s < 3, snapshot_s  # nothing stored before is lost
        stored, append_s = await timed(
            store.append(C, 7, Turn("user", "back"), Turn("bot", "stored"), expected=snapshot.epochs)
        )
        assert stored is True and append_s < 3
        assert await store.get(C) == [*earlier, Turn("user", "back"), Turn("bot", "stored")]  # "during" is not there
        assert await chat.respond(C, 7, "still there?") == Reply("re: still there?")
        assert await store.counts() == (1, 8)
    finally:
        await store.close()
