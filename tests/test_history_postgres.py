"""PostgreSQL only: schema creation and versions, and the one-line reasons a URL cannot be used."""

from __future__ import annotations

import asyncio
import socket

import psycopg
import pytest

from bot.core.types import Conversation, Turn
from bot.history import HistoryUnavailable, NewerSchema, open_store, redact
from bot.history.postgres import SCHEMA_VERSION
from tests.postgres import PASSWORD, PostgresServer


async def test_processes_starting_together_create_the_schema_once(postgres_url: str) -> None:
    stores = await asyncio.gather(*(open_store(postgres_url, max_turns=4) for _ in range(6)))
    try:
        await stores[0].append(Conversation(1), 7, Turn("user", "hi"))
        assert [await s.get(Conversation(1)) for s in stores] == [[Turn("user", "hi")]] * 6
    finally:
        for s in stores:
            await s.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM history_schema").fetchall() == [(SCHEMA_VERSION,)]


async def test_newer_schema_refused_and_left_alone(postgres_url: str) -> None:
    await (await open_store(postgres_url, max_turns=4)).close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE history_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(
        NewerSchema, match=rf"newer version of the bot \(schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION}\)"
    ) as caught:
        await open_store(postgres_url, max_turns=4)
    assert PASSWORD not in str(caught.value)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM history_schema").fetchone() == (SCHEMA_VERSION + 1,)


async def test_version_1_database_migrated_in_place(postgres_url: str) -> None:
    """A database of the schema before server settings (1): its turns kept, `guild_settings` added."""
    store = await open_store(postgres_url, max_turns=4)
    await store.append(Conversation(1, 100), 7, Turn("user", "old", "Alice"), Turn("bot", "answer"))
    await store.close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("DROP TABLE guild_settings")
        conn.execute("UPDATE history_schema SET version = 1")
    store = await open_store(postgres_url, max_turns=4)
    try:
        assert await store.get(Conversation(1, 100)) == [Turn("user", "old", "Alice"), Turn("bot", "answer")]
        assert await store.guild_settings(100) == []
        await store.set_guild_settings(100, [("block_role", 5, "")])
        assert await store.guild_settings(100) == [("block_role", 5, "")]
    finally:
        await store.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM history_schema").fetchall() == [(SCHEMA_VERSION,)] == [(2,)]


async def test_a_foreign_turns_table_is_not_touched(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE turns (x INTEGER)")
    with pytest.raises(HistoryUnavailable, match="already has a `turns` table"):
        await open_store(postgres_url, max_turns=4)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize(
    ("which", "says"),
    [
        ("wrong password", "password authentication failed"),
        ("no such database", "names a database that does not exist"),
        ("unreachable", "cannot be reached:"),
    ],
)
async def test_unusable_urls_are_one_line_without_the_password(
    postgres_server: PostgresServer, which: str, says: str
) -> None:
    url = {
        "wrong password": postgres_server.url(password="not-the-password"),
        "no such database": postgres_server.url("nope"),
        "unreachable": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_closed_port()}/postgres",
    }[which]
    with pytest.raises(HistoryUnavailable) as caught:
        await open_store(url, max_turns=4)
    message = str(caught.value)
    assert says in message and "\n" not in message
    assert PASSWORD not in message and "not-the-password" not in message


def test_redact_hides_passwords() -> None:
    assert redact("postgresql://bot:hunter2@db:5432/chat") == "postgresql://bot:***@db:5432/chat"
    assert redact("postgres://db/chat?user=bot&password=hunter2&sslmode=require") == (
        "postgres://db/chat?user=bot&password=***&sslmode=require"
    )
    assert redact("postgresql://bot@db/chat") == "postgresql://bot@db/chat"


async def test_a_connection_broken_under_the_pool_is_replaced_before_use(postgres_url: str) -> None:
    """As after a server restart: the next operation gets a working connection, not an error."""
    store = await open_store(postgres_url, max_turns=4)
    try:
        await store.append(Conversation(1), 7, Turn("user", "hi"))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert await store.get(Conversation(1)) == [Turn("user", "hi")]
    finally:
        await store.close()


async def test_a_transaction_aborted_by_a_deadlock_runs_once_more(postgres_url: str) -> None:
    from bot.history import HistoryError
    from bot.history.postgres import PostgresHistoryStore

    store = await open_store(postgres_url, max_turns=4)
    assert isinstance(store, PostgresHistoryStore)
    tries: list[int] = []

    async def work(cur: psycopg.AsyncCursor[object]) -> int:
        tries.append(1)
        await cur.execute("INSERT INTO epochs (scope, id, epoch) VALUES ('channel', 5, 1) ON CONFLICT DO NOTHING")
        if len(tries) in (1, 3, 4):  # the first call fails once, the second twice
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return len(tries)

    try:
        assert await store._transaction(work) == 2  # the first try was rolled back whole, then run again
        with pytest.raises(HistoryError, match="deadlock"):  # once more only
            await store._transaction(work)
        assert len(tries) == 4
    finally:
        await store.close()
