"""Per-conversation history in SQLite: bounded, persistent, and safe across crashes.

WAL mode with `synchronous=NORMAL` keeps every committed turn through a process crash (`kill -9`);
each append is one transaction, so a file is never left half-written. The schema version lives in
`PRAGMA user_version`; an older file is migrated in place when it is opened (one transaction), a
newer one is refused.

Versions: 1 is the first schema; 2 adds `speaker`, the display name of whoever said a user turn in a
server channel (turns stored by version 1 read back with no speaker).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bot.types import Conversation, Turn

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id   INTEGER NOT NULL,
    guild_id     INTEGER,
    user_id      INTEGER,          -- the person the turn belongs to: its author, or whom the bot answered
    role         TEXT NOT NULL CHECK (role IN ('user', 'bot')),
    text         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    speaker      TEXT              -- display name of whoever said a user turn in a server channel, else NULL
);
CREATE INDEX IF NOT EXISTS turns_by_channel ON turns (channel_id, id);
CREATE INDEX IF NOT EXISTS turns_by_guild ON turns (guild_id);
CREATE INDEX IF NOT EXISTS turns_by_user ON turns (user_id);
"""

# version -> the statements that bring a file of the version before it up to it
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE turns ADD COLUMN speaker TEXT",),
}


class HistoryStore:
    """Turns per conversation (channel, thread or DM), newest `max_turns` kept."""

    def __init__(self, path: str | Path, max_turns: int) -> None:
        self.path = str(path)
        self.max_turns = max_turns
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")  # the first read: fails here if the file is not a database
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer version of the bot (schema {version} > {SCHEMA_VERSION})"
            )
        return version

    def _migrate(self) -> None:
        if self._version() == SCHEMA_VERSION:
            return
        with self._transaction():
            version = self._version()  # again, under the write lock: another process may have just migrated it
            if version < 1:  # a new file: the current schema at once
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[step]:
                        self._db.execute(statement)
                log.info("migrated %s from schema %d to %d", self.path, version, SCHEMA_VERSION)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed whole or rolled back whole."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, conversation: Conversation) -> list[Turn]:
        """The kept turns of a conversation, oldest first."""
        rows = self._db.execute(
            "SELECT role, text, speaker FROM"
            " (SELECT id, role, text, speaker FROM turns WHERE channel_id = ? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id",
            (conversation.channel_id, self.max_turns),
        ).fetchall()
        return [Turn(role, text, speaker) for role, text, speaker in rows]

    def append(self, conversation: Conversation, user_id: int | None, *turns: Turn) -> None:
        """Store turns in one transaction, then trim the conversation to `max_turns`."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT INTO turns (channel_id, guild_id, user_id, role, text, created_at, speaker)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (conversation.channel_id, conversation.guild_id, user_id, t.role, t.text, now, t.speaker)
                    for t in turns
                ],
            )
            self._db.execute(
                "DELETE FROM turns WHERE channel_id = ? AND id NOT IN"
                " (SELECT id FROM turns WHERE channel_id = ? ORDER BY id DESC LIMIT ?)",
                (conversation.channel_id, conversation.channel_id, self.max_turns),
            )

    def reset(self, conversation: Conversation) -> int:
        """Forget one conversation; returns how many turns were removed."""
        with self._transaction():
            return self._db.execute("DELETE FROM turns WHERE channel_id = ?", (conversation.channel_id,)).rowcount

    def reset_guild(self, guild_id: int) -> int:
        """Forget every conversation of a server; returns how many turns were removed."""
        with self._transaction():
            return self._db.execute("DELETE FROM turns WHERE guild_id = ?", (guild_id,)).rowcount

    def forget_user(self, user_id: int) -> int:
        """Delete every turn written by or to one person, in every conversation."""
        with self._transaction():
            return self._db.execute("DELETE FROM turns WHERE user_id = ?", (user_id,)).rowcount

    def counts(self) -> tuple[int, int]:
        """(conversations, turns) currently stored."""
        row = self._db.execute("SELECT COUNT(DISTINCT channel_id), COUNT(*) FROM turns").fetchone()
        return int(row[0]), int(row[1])

    def close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("could not checkpoint the history database: %s", exc)
        self._db.close()
