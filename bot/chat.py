"""The chat service: one conversation step, the same for Discord, the console and the tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from bot.engine import EngineBusy, EngineClosed, EngineStats, GenerationTimeout
from bot.history import HistoryStore
from bot.types import Conversation, Reply, Turn

log = logging.getLogger(__name__)

BUSY_TEXT = "I'm busy with a lot of conversations right now. Please try again in a moment."
TIMEOUT_TEXT = "Sorry, that took me too long to think about. Could you try again, maybe in fewer words?"
ERROR_TEXT = "Sorry, something went wrong on my side and I couldn't answer. Please try again."
CLOSING_TEXT = "I'm restarting right now, so I can't answer this one. Please ask again in a minute."
EMPTY_REPLY_TEXT = "I'm not sure what to say to that. Could you tell me more?"


class ReplyEngine(Protocol):
    async def reply(self, history: Sequence[Turn]) -> str: ...

    def stats(self) -> EngineStats: ...


class ChatService:
    """Locks a conversation, reads its history, asks the engine, and stores both turns.

    Messages in one conversation are answered strictly in order: the next waits until the previous
    reply is in the history. Different conversations run concurrently (and batch in the engine).
    """

    def __init__(self, engine: ReplyEngine, history: HistoryStore) -> None:
        self.engine = engine
        self.history = history
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Conversation steps currently waiting for or running on the engine."""
        return self._in_flight

    async def respond(self, conversation: Conversation, user_id: int | None, text: str) -> Reply:
        """Answer `text` said in `conversation`. Never raises for engine trouble: returns a notice."""
        self._in_flight += 1
        try:
            async with self._locked(conversation.channel_id):
                turns = self.history.get(conversation) + [Turn("user", text)]
                try:
                    answer = await self.engine.reply(turns)
                except EngineBusy:
                    log.warning("queue full; told channel %s to try again", conversation.channel_id)
                    return Reply(BUSY_TEXT, ok=False)
                except GenerationTimeout:
                    return Reply(TIMEOUT_TEXT, ok=False)
                except EngineClosed:
                    return Reply(CLOSING_TEXT, ok=False)
                except Exception:
                    log.exception("the engine failed to answer in channel %s", conversation.channel_id)
                    return Reply(ERROR_TEXT, ok=False)
                if not answer.strip():
                    return Reply(EMPTY_REPLY_TEXT, ok=False)
                self.history.append(conversation, user_id, Turn("user", text), Turn("bot", answer))
                return Reply(answer)
        finally:
            self._in_flight -= 1

    @asynccontextmanager
    async def _locked(self, channel_id: int) -> AsyncIterator[None]:
        """Hold the conversation's lock; the lock is dropped once nobody holds or awaits it."""
        lock, users = self._locks.get(channel_id, (asyncio.Lock(), 0))
        self._locks[channel_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[channel_id]
            if users == 1:
                del self._locks[channel_id]
            else:
                self._locks[channel_id] = (lock, users - 1)

    def reset(self, conversation: Conversation) -> int:
        return self.history.reset(conversation)

    def reset_guild(self, guild_id: int) -> int:
        return self.history.reset_guild(guild_id)

    def forget_user(self, user_id: int) -> int:
        return self.history.forget_user(user_id)
