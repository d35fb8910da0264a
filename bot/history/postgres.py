"""History in a PostgreSQL database, shared by every bot process that names it.

Driver: psycopg 3 with its `AsyncConnectionPool` (psycopg_pool). Chosen over asyncpg because it takes
exactly libpq's connection strings and environment (every URL parameter, `PGPASSWORD`, `~/.pgpass`,
service files, `sslmode`, unix sockets via `?host=/path`), so `HISTORY_DB` means what it means to
`psql "$HISTORY_DB"`; and because its errors carry libpq's own messages, which `open` turns into one
line.

Promises (see `bot.history`): every append is one transaction, committed before the reply is posted;
resets bump an epoch row in the same transaction as their delete. `append` with `expected` epochs
first makes sure the epoch rows exist (`INSERT ... ON CONFLICT DO NOTHING`, in a fixed order, so two
appends never deadlock), then reads them `FOR SHARE`: a reset running at that moment either
committed already (its new epoch is seen, nothing is stored) or waits for the append to commit and
then deletes its turns too.

The schema version lives in `history_schema`; an older schema is migrated when a store opens, under
a transaction-scoped advisory lock so that processes starting together create it once; a newer one
is refused. PostgreSQL's text cannot hold NUL characters: they are stored as U+FFFD.

While the server is down or unreachable, each call waits at most `POOL_WAIT_S` for a connection and
then raises `HistoryError`; a write that fails is rolled back by the server. The pool gives up a
failing reconnection after `RECONNECT_S` rather than backing off for minutes, so the next call once
the server is back connects at once (psycopg_pool's default doubles its delay between attempts for
up to five minutes, so a server back after a minute's outage could still be left untried for another).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from bot.core.types import Conversation, Turn
from bot.history import (
    Epochs,
    HistoryError,
    HistoryUnavailable,
    NewerSchema,
    SettingChange,
    Snapshot,
    most_turns,
    redact,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Aborted only because of another transaction; the same work succeeds when run again.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

SCHEMA_VERSION = 2
# pg_advisory_xact_lock key for creating or migrating the schema ("bothist" in ASCII).
SCHEMA_LOCK = 0x626F7468697374
CONNECT_TIMEOUT_S = 10
POOL_SIZE = 4
# How long a call waits for a pooled connection before `HistoryError`: a healthy pool lends one in
# milliseconds, so only a server that is down or unreachable makes a user wait this long.
POOL_WAIT_S = 5.0
# How long the pool keeps retrying one failed connection attempt (backing off) before giving it up;
# the next call that finds no connection starts a new attempt at once.
RECONNECT_S = 2.0

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE turns (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel_id  BIGINT NOT NULL,
        guild_id    BIGINT,
        user_id     BIGINT,         -- the person the turn belongs to: its author, or whom the bot answered
        role        TEXT NOT NULL CHECK (role IN ('user', 'bot')),
        text        TEXT NOT NULL,
        created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
        speaker     TEXT            -- display name of whoever said a user turn in a server channel, else NULL
    )""",
    "CREATE INDEX turns_by_channel ON turns (channel_id, id)",
    "CREATE INDEX turns_by_guild ON turns (guild_id)",
    "CREATE INDEX turns_by_user ON turns (user_id)",
    """CREATE TABLE epochs (
        scope  TEXT NOT NULL CHECK (scope IN ('channel', 'guild', 'user')),
        id     BIGINT NOT NULL,
        epoch  BIGINT NOT NULL,
        PRIMARY KEY (scope, id)
    )""",
)
# A server's settings, one row each (see bot.history.sqlite and bot.core.guild_settings); version 2.
_GUILD_SETTINGS = """CREATE TABLE guild_settings (
        guild_id  BIGINT NOT NULL,
        kind      TEXT NOT NULL,
        target    BIGINT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (guild_id, kind, target)
    )"""
_SCHEMA = (*_SCHEMA, _GUILD_SETTINGS)
# version -> the statements that bring a database of the version before it up to it
_MIGRATIONS: dict[int, tuple[str, ...]] = {2: (_GUILD_SETTINGS,)}

# One statement, so one snapshot: the epochs, then the newest turns (none: a single row of NULLs).
_SNAPSHOT = """
WITH e AS (
    SELECT COALESCE((SELECT epoch FROM epochs WHERE scope = 'channel' AND id = %(channel)s), 0) AS channel,
           COALESCE((SELECT epoch FROM epochs WHERE scope = 'guild' AND id = %(guild)s), 0) AS guild,
           COALESCE((SELECT epoch FROM epochs WHERE scope = 'user' AND id = %(user)s), 0) AS "user"
), t AS (
    SELECT id, role, text, speaker FROM turns WHERE channel_id = %(channel)s ORDER BY id DESC LIMIT %(limit)s
)
SELECT e.channel, e.guild, e."user", t.role, t.text, t.speaker FROM e LEFT JOIN t ON true ORDER BY t.id
"""
_GET = (
    "SELECT role, text, speaker FROM"
    " (SELECT id, role, text, speaker FROM turns WHERE channel_id = %s ORDER BY id DESC LIMIT %s) AS newest"
    " ORDER BY id"
)
_ENSURE_EPOCHS = (
    "INSERT INTO epochs (scope, id, epoch)"
    " SELECT scope, id, 0 FROM (VALUES ('channel', %s::bigint), ('guild', %s::bigint), ('user', %s::bigint))"
    " AS k (scope, id) WHERE id IS NOT NULL ORDER BY scope ON CONFLICT DO NOTHING"
)
_LOCK_EPOCHS = (
    "SELECT scope, epoch FROM epochs WHERE (scope = 'channel' AND id = %s) OR (scope = 'guild' AND id = %s)"
    " OR (scope = 'user' AND id = %s) ORDER BY scope FOR SHARE"
)
_INSERT = "INSERT INTO turns (channel_id, guild_id, user_id, role, text, speaker) VALUES (%s, %s, %s, %s, %s, %s)"
_TRIM = (
    "DELETE FROM turns WHERE channel_id = %(channel)s AND id NOT IN"
    " (SELECT id FROM turns WHERE channel_id = %(channel)s ORDER BY id DESC LIMIT %(keep)s)"
    " AND (SELECT COUNT(*) FROM turns WHERE channel_id = %(channel)s) > %(most)s"
)
_BUMP = (
    "INSERT INTO epochs (scope, id, epoch) VALUES (%s, %s, 1)"
    " ON CONFLICT (scope, id) DO UPDATE SET epoch = epochs.epoch + 1"
)


async def _locked_epochs(cur: psycopg.AsyncCursor[Any], conversation: Conversation, user_id: int | None) -> Epochs:
    """The conversation's epochs, their rows made sure of and locked FOR SHARE until the transaction ends:
    a reset either committed before (its epoch is seen here) or waits for this transaction."""
    keys = (conversation.channel_id, conversation.guild_id, user_id)
    await cur.execute(_ENSURE_EPOCHS, keys)
    await cur.execute(_LOCK_EPOCHS, keys)
    found = dict(await cur.fetchall())
    return Epochs(
        int(found.get("channel", 0)),
        int(found.get("guild", 0)) if conversation.guild_id is not None else 0,
        int(found.get("user", 0)) if user_id is not None else 0,
    )


class PostgresHistoryStore:
    """Turns per conversation in PostgreSQL, newest `max_turns` kept (cut in steps); open with
    `PostgresHistoryStore.open`."""

    def __init__(self, pool: AsyncConnectionPool, max_turns: int, display: str) -> None:
        self._pool = pool
        self.max_turns = max_turns
        self.display = display  # the URL without its password, for messages

    @classmethod
    async def open(cls, url: str, max_turns: int, *, pool_size: int = POOL_SIZE) -> PostgresHistoryStore:
        """Connect, create or migrate the schema, and start the pool.

        One direct connection comes first: the pool retries a failing server for minutes, while a
        wrong URL, password or database name should be one line at once (`HistoryUnavailable`).
        """
        display = redact(url)
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise HistoryUnavailable(connect_failure(exc, url)) from None
        try:
            async with conn:
                await migrate(conn, display)
        except psycopg.Error as exc:
            raise HistoryUnavailable(f"cannot be used: {first_line(exc, url)}") from None
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            timeout=POOL_WAIT_S,
            reconnect_timeout=RECONNECT_S,
            open=False,
            name="history",
            # A connection is checked (one round trip) before it is lent, so one broken by a server
            # restart or a dropped network is replaced instead of failing the next reply.
            check=AsyncConnectionPool.check_connection,
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except (psycopg.Error, PoolTimeout) as exc:
            await pool.close()
            raise HistoryUnavailable(f"cannot be reached: {first_line(exc, url)}") from None
        return cls(pool, max_turns, display)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; a database failure becomes `HistoryError`."""
        try:
            async with self._pool.connection() as conn:
                yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise HistoryError(f"PostgreSQL: {first_line(exc)}") from exc

    async def _transaction(self, work: Callable[[psycopg.AsyncCursor[Any]], Awaitable[T]]) -> T:
        """Run `work` in one transaction. Two deletes over overlapping rows (a channel reset beside a
        server-wide one, or beside /forget-me) can lock them in opposite orders; PostgreSQL then aborts
        one of them, which is rolled back whole and run once more."""
        for attempt in (1, 2):
            try:
                async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                    return await work(cur)
            except HistoryError as exc:
                if attempt == 2 or not isinstance(exc.__cause__, _RETRYABLE):
                    raise
                log.info("a history transaction was aborted (%s); running it again", first_line(exc.__cause__))
        raise AssertionError("unreachable")

    async def get(self, conversation: Conversation) -> list[Turn]:
        async with self._connection() as conn:
            cur = await conn.execute(_GET, (conversation.channel_id, most_turns(self.max_turns)))
            return [Turn(role, text, speaker) for role, text, speaker in await cur.fetchall()]

    async def snapshot(self, conversation: Conversation, user_id: int | None) -> Snapshot:
        params = {
            "channel": conversation.channel_id,
            "guild": conversation.guild_id,
            "user": user_id,
            "limit": most_turns(self.max_turns),
        }
        async with self._connection() as conn:
            rows = await (await conn.execute(_SNAPSHOT, params)).fetchall()
        epochs = Epochs(int(rows[0][0]), int(rows[0][1]), int(rows[0][2]))
        return Snapshot([Turn(r[3], r[4], r[5]) for r in rows if r[3] is not None], epochs)

    async def append(
        self, conversation: Conversation, user_id: int | None, *turns: Turn, expected: Epochs | None = None
    ) -> bool:
        keys = (conversation.channel_id, conversation.guild_id, user_id)

        async def write(cur: psycopg.AsyncCursor[Any]) -> bool:
            if expected is not None and await _locked_epochs(cur, conversation, user_id) != expected:
                return False
            await cur.executemany(
                _INSERT,
                [(*keys, t.role, _no_nul(t.text), _no_nul(t.speaker) if t.speaker else t.speaker) for t in turns],
            )
            most = most_turns(self.max_turns)
            await cur.execute(_TRIM, {"channel": conversation.channel_id, "keep": self.max_turns, "most": most})
            return True

        return await self._transaction(write)

    async def replace_last_reply(
        self, conversation: Conversation, user_id: int | None, old: str, new: str, *, expected: Epochs
    ) -> bool:
        async def write(cur: psycopg.AsyncCursor[Any]) -> bool:
            if await _locked_epochs(cur, conversation, user_id) != expected:
                return False
            await cur.execute(
                "SELECT id, role, text FROM turns WHERE channel_id = %s ORDER BY id DESC LIMIT 1 FOR UPDATE",
                (conversation.channel_id,),
            )
            row = await cur.fetchone()
            if row is None or row[1] != "bot" or row[2] != _no_nul(old):
                return False
            await cur.execute("UPDATE turns SET text = %s, created_at = now() WHERE id = %s", (_no_nul(new), row[0]))
            return True

        return await self._transaction(write)

    async def _clear(self, scope: str, column: str, ident: int) -> int:
        async def clear(cur: psycopg.AsyncCursor[Any]) -> int:
            await cur.execute(_BUMP, (scope, ident))
            await cur.execute(f"DELETE FROM turns WHERE {column} = %s", (ident,))
            return cur.rowcount

        return await self._transaction(clear)

    async def reset(self, conversation: Conversation) -> int:
        return await self._clear("channel", "channel_id", conversation.channel_id)

    async def reset_guild(self, guild_id: int) -> int:
        return await self._clear("guild", "guild_id", guild_id)

    async def forget_user(self, user_id: int) -> int:
        return await self._clear("user", "user_id", user_id)

    async def guild_settings(self, guild_id: int) -> list[tuple[str, int, str]]:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT kind, target, value FROM guild_settings WHERE guild_id = %s ORDER BY kind, target", (guild_id,)
            )
            return [(str(kind), int(target), str(value)) for kind, target, value in await cur.fetchall()]

    async def set_guild_settings(self, guild_id: int, changes: Sequence[SettingChange]) -> int:
        async def write(cur: psycopg.AsyncCursor[Any]) -> int:
            changed = 0
            for kind, target, value in changes:
                if value is None:
                    await cur.execute(
                        "DELETE FROM guild_settings WHERE guild_id = %s AND kind = %s AND target = %s",
                        (guild_id, kind, target),
                    )
                    changed += cur.rowcount
                    continue
                await cur.execute(
                    "INSERT INTO guild_settings (guild_id, kind, target, value) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (guild_id, kind, target) DO UPDATE SET value = excluded.value",
                    (guild_id, kind, target, _no_nul(value)),
                )
                changed += 1
            return changed

        return await self._transaction(write)

    async def delete_guild_settings(self, guild_id: int) -> int:
        async def delete(cur: psycopg.AsyncCursor[Any]) -> int:
            await cur.execute("DELETE FROM guild_settings WHERE guild_id = %s", (guild_id,))
            return cur.rowcount

        return await self._transaction(delete)

    async def counts(self) -> tuple[int, int]:
        async with self._connection() as conn:
            row = await (await conn.execute("SELECT COUNT(DISTINCT channel_id), COUNT(*) FROM turns")).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def close(self) -> None:
        await self._pool.close()


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The version recorded in the database; 0 where the bot has never created its schema."""
    cur = await conn.execute("SELECT to_regclass('history_schema') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    row = await (await conn.execute("SELECT version FROM history_schema")).fetchone()
    return 0 if row is None else int(row[0])


async def migrate(conn: psycopg.AsyncConnection[Any], display: str) -> None:
    """Create or upgrade the schema, one process at a time; refuse a newer one."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        version = await schema_version(conn)  # under the lock: another process may have just done it
        if version > SCHEMA_VERSION:
            raise NewerSchema(
                f"cannot be used: {display} was written by a newer version of the bot"
                f" (schema {version} > {SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            if await _has_table(conn, "turns"):
                raise HistoryUnavailable(
                    f"cannot be used: {display} already has a `turns` table that is not the bot's;"
                    " name an empty database"
                )
            for statement in _SCHEMA:
                await conn.execute(statement)
            await conn.execute(
                "CREATE TABLE history_schema (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),"
                " version INTEGER NOT NULL)"
            )
            await conn.execute("INSERT INTO history_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            log.info("created the history schema (version %d) in %s", SCHEMA_VERSION, display)
            return
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                await conn.execute(statement)
        await conn.execute("UPDATE history_schema SET version = %s", (SCHEMA_VERSION,))
        log.info("migrated %s from schema %d to %d", display, version, SCHEMA_VERSION)


async def _has_table(conn: psycopg.AsyncConnection[Any], name: str) -> bool:
    row = await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))).fetchone()
    return bool(row and row[0])


def _no_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd")


def first_line(exc: BaseException, url: str | None = None) -> str:
    """The first line of a driver message, without any password it could quote."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.removeprefix("connection failed: ").replace("FATAL:  ", "")
    if url is not None:
        text = text.replace(url, redact(url))
    return text


def connect_failure(exc: psycopg.Error, url: str) -> str:
    """Why connecting failed, as the rest of a `HISTORY_DB <url> ...` line: unreachable, login refused,
    no such database, or libpq's own words."""
    message = str(exc)
    lower = message.lower()
    details = first_line(exc, url)
    if "does not exist" in lower and "database" in lower:
        return f"names a database that does not exist ({details}); create it first, e.g. with createdb"
    if "authentication failed" in lower or "no password supplied" in lower or "pg_hba.conf" in lower:
        return f"was refused by the server: {details}; check the user name and password"
    if "role" in lower and "does not exist" in lower:
        return f"was refused by the server: {details}; check the user name"
    if any(
        words in lower
        for words in ("connection refused", "could not translate host", "timeout expired", "no such file", "resolve")
    ):
        return f"cannot be reached: {details}; is the PostgreSQL server running there?"
    return f"cannot be used: {details}"
