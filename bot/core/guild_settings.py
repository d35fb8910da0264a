"""What a server's admins decide: where the bot speaks, whom it ignores, which channels it listens in,
and its persona. Plain values and the store behind them; no discord.

Settings live in the history database (`guild_settings`, one row per setting), so they survive
restarts and are shared by every process on that database. Each process keeps a server's settings
for `SETTINGS_TTL_S` seconds: a change made through this process applies at once (its copy is
dropped), one made by another process applies here within `SETTINGS_TTL_S`.

Rows (kind, target, value):
- `allow` / `block`, target a channel or category id: the allow list and the block list;
- `listen`, target a channel or thread id, value the pace in seconds (at most one reply per pace);
- `block_user` / `block_role`, target a user or role id: people the bot does not answer;
- `persona`, target 0 for the server or a channel id, value the persona's template.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bot.history import HistoryError, HistoryStore, SettingChange

log = logging.getLogger(__name__)

# How long a process trusts its copy of a server's settings before reading them again: a change made
# in another process sharing the database applies here within this many seconds.
SETTINGS_TTL_S = 2.0
# The pace of a listening channel unless the admin gives one: at most one reply per this many seconds.
DEFAULT_PACE_S = 10.0
MIN_PACE_S, MAX_PACE_S = 1.0, 3600.0
# A persona longer than this is refused whatever the model (Discord lets an option hold 6000).
PERSONA_MAX_CHARS = 4000
PLACEHOLDERS = ("{server}", "{channel}", "{date}")
SERVER = 0  # the target of a server-wide setting


@dataclass(frozen=True)
class GuildConfig:
    """One server's settings; the default (nothing set) is the bot as it always was."""

    allowed: frozenset[int] = frozenset()  # channels and categories; empty: everywhere not blocked
    blocked: frozenset[int] = frozenset()
    listening: Mapping[int, float] = field(default_factory=dict)  # channel or thread -> pace (s)
    blocked_users: frozenset[int] = frozenset()
    blocked_roles: frozenset[int] = frozenset()
    persona: str | None = None  # the server's
    channel_personas: Mapping[int, str] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: list[tuple[str, int, str]]) -> GuildConfig:
        sets: dict[str, set[int]] = {k: set() for k in ("allow", "block", "block_user", "block_role")}
        listening: dict[int, float] = {}
        personas: dict[int, str] = {}
        for kind, target, value in rows:
            if kind in sets:
                sets[kind].add(target)
            elif kind == "listen":
                try:
                    listening[target] = float(value)
                except ValueError:
                    listening[target] = DEFAULT_PACE_S
            elif kind == "persona":
                personas[target] = value
            else:  # written by a newer version of the bot: not ours to judge
                log.debug("ignoring server setting %r", kind)
        server = personas.pop(SERVER, None)
        return cls(
            allowed=frozenset(sets["allow"]),
            blocked=frozenset(sets["block"]),
            listening=listening,
            blocked_users=frozenset(sets["block_user"]),
            blocked_roles=frozenset(sets["block_role"]),
            persona=server,
            channel_personas=personas,
        )

    def may_speak(self, channel_id: int, category_id: int | None) -> bool:
        """Whether the bot may answer in a channel (for a thread: its parent) in `category_id`.

        The most specific entry wins: the channel's own (blocked or allowed), then its category's;
        with neither, the bot speaks unless there is an allow list.
        """
        for place in (channel_id, category_id):
            if place is None:
                continue
            if place in self.blocked:
                return False
            if place in self.allowed:
                return True
        return not self.allowed

    def ignores(self, user_id: int, role_ids: list[int]) -> bool:
        """Whether a person is blocked, themselves or through one of their roles."""
        return user_id in self.blocked_users or any(r in self.blocked_roles for r in role_ids)

    def pace(self, channel_id: int, parent_id: int | None) -> float | None:
        """The pace of a listening channel or thread (a thread listens where its parent does); None: not listening."""
        if channel_id in self.listening:
            return self.listening[channel_id]
        if parent_id is not None:
            return self.listening.get(parent_id)
        return None

    def persona_for(self, channel_id: int, parent_id: int | None) -> tuple[str | None, str]:
        """The persona template in force in a channel or thread and where it comes from:
        the thread's or channel's own, then the parent channel's, then the server's; (None, "") if none."""
        for place, source in ((channel_id, "this channel"), (parent_id, "the parent channel")):
            if place is not None and place in self.channel_personas:
                return self.channel_personas[place], source
        if self.persona is not None:
            return self.persona, "the server"
        return None, ""


def render_persona(template: str, *, server: str, channel: str, today: dt.date | None = None) -> str:
    """The persona with `{server}`, `{channel}` and `{date}` filled in (other braces are left as written)."""
    day = (today or dt.datetime.now(dt.timezone.utc).date()).isoformat()
    return template.replace("{server}", server).replace("{channel}", channel).replace("{date}", day)


class GuildSettings:
    """Each server's `GuildConfig`, read from the history database and kept `SETTINGS_TTL_S` seconds."""

    def __init__(self, store: HistoryStore, *, ttl: float = SETTINGS_TTL_S) -> None:
        self.store = store
        self.ttl = ttl
        self._cache: dict[int, tuple[float, GuildConfig]] = {}
        # Callers waiting for a server's settings, and the lock they queue on (FIFO): while anyone waits,
        # a later caller queues too, even if the copy is fresh again, so nobody overtakes a message
        # that came before it.
        self._queued: dict[int, int] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._changes = 0  # counts this process's changes: a read begun before one does not fill the cache

    def _fresh(self, guild_id: int) -> GuildConfig | None:
        cached = self._cache.get(guild_id)
        return cached[1] if cached is not None and cached[0] > time.monotonic() else None

    async def get(self, guild_id: int) -> GuildConfig:
        """The server's settings. If the database cannot be read, the last copy read stays in force
        (the defaults when there is none): a database outage does not stop the bot answering.

        A fresh copy is returned without suspending while nobody waits; callers that find it stale
        queue, one reads, and they resume in the order they asked, so messages keep their order."""
        fresh = self._fresh(guild_id)
        if fresh is not None and not self._queued.get(guild_id):
            return fresh
        self._queued[guild_id] = self._queued.get(guild_id, 0) + 1
        lock = self._locks.setdefault(guild_id, asyncio.Lock())
        try:
            async with lock:
                fresh = self._fresh(guild_id)
                if fresh is not None:
                    return fresh
                cached = self._cache.get(guild_id)
                return await self._read(guild_id, cached[1] if cached else None)
        finally:
            left = self._queued[guild_id] - 1
            if left:
                self._queued[guild_id] = left
            else:
                del self._queued[guild_id]
                del self._locks[guild_id]

    async def _read(self, guild_id: int, last: GuildConfig | None) -> GuildConfig:
        changes = self._changes
        try:
            config = GuildConfig.from_rows(await self.store.guild_settings(guild_id))
        except HistoryError as exc:
            config = last if last is not None else GuildConfig()
            log.warning("could not read the settings of server %s (%s); using the last known ones", guild_id, exc)
        if changes == self._changes:
            self._cache[guild_id] = (time.monotonic() + self.ttl, config)
        return config

    async def set(self, guild_id: int, changes: Sequence[SettingChange]) -> int:
        """Store (or, with a value of None, delete) settings, all or none; in force in this process at
        once. Returns how many rows changed. Raises `HistoryError`."""
        try:
            return await self.store.set_guild_settings(guild_id, changes)
        finally:
            self._forget_copy(guild_id)

    def _forget_copy(self, guild_id: int) -> None:
        self._changes += 1
        self._cache.pop(guild_id, None)  # and a read begun before the change does not fill it again

    async def forget(self, guild_id: int) -> int:
        """Delete every setting of a server (the bot left it). Raises `HistoryError`."""
        try:
            return await self.store.delete_guild_settings(guild_id)
        finally:
            self._forget_copy(guild_id)
