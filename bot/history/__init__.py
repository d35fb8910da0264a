"""Per-conversation history: one asynchronous interface, two backends.

`HISTORY_DB` names the store: a file path is an SQLite database (`bot.history.sqlite`, the default,
one process), a `postgresql://` URL is a PostgreSQL database (`bot.history.postgres`, shared by any
number of bot processes). Both keep the same promises:

- a turn is committed before its reply is posted (`append` returns once it is durable);
- each conversation keeps at least its newest `max_turns` turns, and at most `most_turns(max_turns)`:
  past that it is cut back to `max_turns` at once (see `most_turns`);
- `/reset`, a server-wide reset and `/forget-me` hold for every process sharing the database, also
  against a reply being generated at that moment. Each reset bumps an *epoch* (per channel, server
  and user) in the same transaction as its delete; a reply is stored only if the epochs it read
  before generating are unchanged, checked in the same transaction as the insert
  (`snapshot` + `append(..., expected=...)`).

The same database keeps each server's settings (`guild_settings`: where the bot speaks, whom it
ignores, its persona), read and written through `bot.core.guild_settings.GuildSettings`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

from bot.core.types import Conversation, Turn

POSTGRES_URL = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
SettingChange = tuple[str, int, str | None]  # (kind, target, value), a value of None deleting the setting


def most_turns(max_turns: int) -> int:
    """How many turns a conversation may grow to before it is cut back to its newest `max_turns`.

    Cutting in steps keeps a conversation's oldest turn in place for several messages, so each prompt
    starts as the one before did and the engine's prefix cache (`bot/engine/prefix_cache.py`) reads
    only what is new. Trimming one exchange per message would change the prompt's start every time,
    and every message would be read whole again. The price: a conversation shows the model between
    `max_turns` and this many turns: half as many more, in whole exchanges.
    """
    return max_turns + ((max_turns // 2) & ~1)


class HistoryError(Exception):
    """The history store failed (I/O, lost connection, locked too long): the caller degrades gracefully."""


class HistoryUnavailable(HistoryError):
    """The store cannot be opened; the message is one line saying why, never a password."""


class NewerSchema(HistoryUnavailable):
    """The database was written by a newer version of the bot; it is left untouched."""


class Epochs(NamedTuple):
    """How many times a conversation's channel, its server and a user have been cleared (0: never)."""

    channel: int
    guild: int
    user: int


@dataclass(frozen=True)
class Snapshot:
    """A conversation's kept turns (oldest first) and the epochs they were read under, read together."""

    turns: list[Turn]
    epochs: Epochs


class HistoryStore(Protocol):
    """Turns per conversation (channel, thread or DM), newest `max_turns` kept. Every method may raise
    `HistoryError`."""

    max_turns: int

    async def get(self, conversation: Conversation) -> list[Turn]:
        """The kept turns of a conversation, oldest first."""
        ...

    async def snapshot(self, conversation: Conversation, user_id: int | None) -> Snapshot:
        """The conversation's turns and the epochs of its channel, server and `user_id`, read together."""
        ...

    async def append(
        self, conversation: Conversation, user_id: int | None, *turns: Turn, expected: Epochs | None = None
    ) -> bool:
        """Store `turns` in one transaction and trim the conversation to `max_turns`.

        With `expected` (from `snapshot`), nothing is stored and False is returned if the channel, the
        server or `user_id` was cleared since: checked in the same transaction as the insert.
        """
        ...

    async def replace_last_reply(
        self, conversation: Conversation, user_id: int | None, old: str, new: str, *, expected: Epochs
    ) -> bool:
        """Replace the text of the conversation's newest turn (Regenerate), in one transaction.

        Only if that turn is the bot's and reads `old`, and the channel, the server and `user_id` (the
        person it answered) were not cleared since `expected` (from `snapshot`); otherwise nothing
        changes and False is returned.
        """
        ...

    async def reset(self, conversation: Conversation) -> int:
        """Forget one conversation; returns how many turns were removed."""
        ...

    async def reset_guild(self, guild_id: int) -> int:
        """Forget every conversation of a server; returns how many turns were removed."""
        ...

    async def forget_user(self, user_id: int) -> int:
        """Delete every turn written by or to one person, in every conversation."""
        ...

    async def guild_settings(self, guild_id: int) -> list[tuple[str, int, str]]:
        """A server's settings rows: (kind, target, value), in the order of kind and target."""
        ...

    async def set_guild_settings(self, guild_id: int, changes: Sequence[SettingChange]) -> int:
        """Apply `changes` to a server's settings in one transaction, all or none: each (kind, target,
        value) replaces the setting of that kind and target, and a value of None deletes it. Returns
        how many rows were stored or deleted."""
        ...

    async def delete_guild_settings(self, guild_id: int) -> int:
        """Delete every setting of a server (the bot left it); returns how many rows went."""
        ...

    async def counts(self) -> tuple[int, int]:
        """(conversations, turns) currently stored."""
        ...

    async def close(self) -> None:
        """Release the database; the store is unusable afterwards."""
        ...


def is_postgres_url(spec: str | Path) -> bool:
    """Whether a `HISTORY_DB` value names a PostgreSQL database rather than an SQLite file."""
    return isinstance(spec, str) and POSTGRES_URL.match(spec) is not None


def redact(url: str) -> str:
    """`url` with its password (in the authority or a `password=` parameter) replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"://[^@/]*@", "://***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query, flags=re.IGNORECASE)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


async def open_store(spec: str | Path, max_turns: int) -> HistoryStore:
    """Open (creating or migrating) the store `spec` names: a `postgresql://` URL, else an SQLite path.

    Raises `HistoryUnavailable` with a one-line reason; SQLite may also raise `OSError` for a path
    that cannot be created.
    """
    if is_postgres_url(spec):
        from bot.history.postgres import PostgresHistoryStore

        return await PostgresHistoryStore.open(str(spec), max_turns)
    from bot.history.sqlite import SQLiteHistoryStore

    return await SQLiteHistoryStore.open(spec, max_turns)


__all__ = [
    "Epochs",
    "HistoryError",
    "HistoryStore",
    "HistoryUnavailable",
    "NewerSchema",
    "Snapshot",
    "is_postgres_url",
    "open_store",
    "redact",
]
