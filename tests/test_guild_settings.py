"""A server's settings as plain values: where, who, listening, personas, and the 2 s copy."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from bot.core.guild_settings import GuildConfig, GuildSettings, render_persona
from bot.history import open_store


def test_the_most_specific_entry_wins() -> None:
    config = GuildConfig.from_rows([("allow", 10, ""), ("block", 11, ""), ("block", 20, ""), ("allow", 21, "")])
    assert config.may_speak(1, 10) and not config.may_speak(11, 10)  # a blocked channel in an allowed category
    assert config.may_speak(21, 20) and not config.may_speak(22, 20)  # an allowed channel in a blocked category
    assert not config.may_speak(30, None)  # an allow list: nowhere else
    assert GuildConfig().may_speak(30, None)  # nothing set: everywhere


def test_who_listening_and_personas() -> None:
    config = GuildConfig.from_rows(
        [("block_user", 7, ""), ("block_role", 8, ""), ("listen", 5, "3"), ("persona", 0, "S"), ("persona", 5, "C")]
    )
    assert config.ignores(7, []) and config.ignores(9, [1, 8]) and not config.ignores(9, [1])
    assert config.pace(5, None) == 3.0 and config.pace(6, 5) == 3.0 and config.pace(6, None) is None
    assert config.persona_for(5, None) == ("C", "this channel")
    assert config.persona_for(6, 5) == ("C", "the parent channel")
    assert config.persona_for(6, None) == ("S", "the server")
    assert render_persona("{server}/{channel}/{date}/{x}", server="S", channel="c", today=dt.date(2025, 1, 2)) == (
        "S/c/2025-01-02/{x}"
    )


async def test_a_copy_is_kept_and_dropped_on_change(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "h.sqlite3", max_turns=4)
    mine, theirs = GuildSettings(store), GuildSettings(store, ttl=60)
    try:
        assert (await theirs.get(1)).persona is None
        await mine.set(1, [("persona", 0, "pirate")])
        assert (await mine.get(1)).persona == "pirate"  # at once where it was changed
        assert (await theirs.get(1)).persona is None  # the other copy, until it expires
        theirs.ttl = 0
        theirs._cache.clear()
        assert (await theirs.get(1)).persona == "pirate"
    finally:
        await store.close()


async def test_callers_resume_in_the_order_they_asked(tmp_path: Path) -> None:
    """A message that arrives just as the shared read finishes (its copy is fresh by then) must still
    wait for the messages that asked before it, or its answer would start first."""
    store = await open_store(tmp_path / "h.sqlite3", max_turns=4)
    settings = GuildSettings(store)
    gate = asyncio.Event()
    order: list[str] = []
    late: list[asyncio.Task[None]] = []
    read = store.guild_settings

    async def ask(name: str) -> None:
        await settings.get(1)
        order.append(name)

    async def slow_read(guild_id: int) -> list[tuple[str, int, str]]:
        await gate.wait()
        rows = await read(guild_id)
        late.append(asyncio.create_task(ask("late")))  # scheduled before the waiting callers resume
        return rows

    store.guild_settings = slow_read  # type: ignore[method-assign]
    try:
        first = [asyncio.create_task(ask(name)) for name in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*first)
        await asyncio.gather(*late)
        assert order == ["a", "b", "c", "late"]
    finally:
        await store.close()
