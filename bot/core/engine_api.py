"""What the chat layer needs of an engine, without loading one: errors, stats and the interface.

Kept apart from `bot.engine` (which loads models with torch) so a bot that talks to a remote engine
(ENGINE_URL, see `bot.remote`) never imports torch or transformers. `bot.engine` re-exports all of
these, so `from bot.engine import EngineBusy` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.core.types import Turn

__all__ = [
    "EngineBusy",
    "EngineClosed",
    "EngineError",
    "EngineSettingsError",
    "EngineStats",
    "GenerationTimeout",
    "ReplyEngine",
    "ServingEngine",
    "percentile",
]


class EngineError(RuntimeError):
    """The model could not be loaded or failed to generate."""


class EngineBusy(EngineError):
    """Too many requests are waiting; try again in a moment."""


class EngineClosed(EngineError):
    """The engine has been closed and takes no more work."""


class EngineSettingsError(EngineError):
    """The settings cannot work with this model (for example SYSTEM_PROMPT fills its whole context)."""


class GenerationTimeout(EngineError):
    """Generation ran past its deadline and was stopped."""


@dataclass(frozen=True)
class EngineStats:
    model: str
    device: str
    precision: str
    queue_depth: int
    running: int
    replies: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    queue_wait_p50_s: float | None
    queue_wait_p95_s: float | None
    tokens_per_second: float | None
    uptime_s: float


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of `values` by nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class ReplyEngine(Protocol):
    """What `ChatService` asks of an engine: the in-process `bot.engine.Engine` or `bot.remote.RemoteEngine`."""

    async def reply(
        self,
        history: Sequence[Turn],
        on_partial: Callable[[str], None] | None = None,
        *,
        system_prompt: str | None = None,
    ) -> str:
        """The bot's next turn. `system_prompt` (a server's or channel's persona) replaces SYSTEM_PROMPT
        for this reply (None: SYSTEM_PROMPT); BlenderBot has no system prompt and ignores it."""
        ...

    async def check_system_prompt(self, text: str) -> str | None:
        """Why `text` cannot be a persona (it leaves the model's context no room for the conversation,
        with the numbers), or None when it can (or this engine cannot tell)."""
        ...

    @property
    def uses_system_prompt(self) -> bool:
        """False when the model reads no system prompt (BlenderBot), so a persona has no effect."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def can_stream(self) -> bool: ...

    def forget_cached_conversations(self) -> int:
        """Drop what the engine keeps of finished conversations (`/forget-me`); how many it dropped."""
        ...


class ServingEngine(ReplyEngine, Protocol):
    """An engine the entrypoint starts before serving and closes at the end."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def failure(self) -> str | None:
        """Why this engine cannot answer any more (its decode loop died or hangs); None while it can.

        A readiness check (`/ready`) and the model server's health check read it.
        """
