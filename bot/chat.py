"""The chat service: one conversation step, the same for Discord, the console and the tests."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from bot.engine_api import EngineBusy, EngineClosed, GenerationTimeout, ReplyEngine
from bot.history import HistoryStore
from bot.types import Conversation, Reply, Turn

log = logging.getLogger(__name__)

BUSY_TEXT = "I'm busy with a lot of conversations right now. Please try again in a moment."
TIMEOUT_TEXT = "Sorry, that took me too long to think about. Could you try again, maybe in fewer words?"
ERROR_TEXT = "Sorry, something went wrong on my side and I couldn't answer. Please try again."
CLOSING_TEXT = "I'm restarting right now, so I can't answer this one. Please ask again in a minute."
EMPTY_REPLY_TEXT = "I'm not sure what to say to that. Could you tell me more?"


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
        self._cleared: dict[tuple[str, int], int] = {}  # ("channel"|"guild"|"user", id) -> times cleared

    @property
    def in_flight(self) -> int:
        """Conversation steps currently waiting for or running on the engine."""
        return self._in_flight

    @property
    def can_stream(self) -> bool:
        """Whether `respond` can report a reply while it is written (see its `on_partial`)."""
        return self.engine.can_stream

    async def respond(
        self,
        conversation: Conversation,
        user_id: int | None,
        text: str,
        *,
        speaker: str | None = None,
        on_partial: Callable[[str], None] | None = None,
    ) -> Reply:
        """Answer `text` said in `conversation`. Never raises: trouble becomes a short notice.

        `speaker` is the display name of the person who said it in a server channel (None in DMs): it
        is stored with the turn and reaches the engine, so a chat model can tell people apart.

        `on_partial`, when the engine can stream, is called with the reply so far as it is written
        (each text extends the one before); the returned `Reply` is still the whole answer, the one
        stored, or a notice if the reply could not be finished.
        """
        self._in_flight += 1
        try:
            async with self._locked(conversation.channel_id):
                try:
                    turns = self.history.get(conversation) + [Turn("user", text, speaker)]
                except sqlite3.Error:
                    log.exception("could not read the history of channel %s", conversation.channel_id)
                    return Reply(ERROR_TEXT, ok=False)
                cleared = self._clear_marks(conversation, user_id)
                try:
                    answer = await self.engine.reply(turns, on_partial)
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
                if self._clear_marks(conversation, user_id) != cleared:
                    # /reset or /forget-me ran while this reply was generated: keep its promise.
                    log.info("history of channel %s was cleared during a reply; not stored", conversation.channel_id)
                    return Reply(answer)
                try:
                    self.history.append(conversation, user_id, Turn("user", text, speaker), Turn("bot", answer))
                except sqlite3.Error:  # the answer is still worth posting
                    log.exception("could not store a reply in channel %s", conversation.channel_id)
                return Reply(answer)
        finally:
            self._in_flight -= 1

    def _clear_marks(self, conversation: Conversation, user_id: int | None) -> tuple[int, int, int]:
        """How often this channel, its server and this user have been cleared so far."""
        marks = self._cleared
        return (
            marks.get(("channel", conversation.channel_id), 0),
            marks.get(("guild", conversation.guild_id), 0) if conversation.guild_id is not None else 0,
            marks.get(("user", user_id), 0) if user_id is not None else 0,
        )

    def _mark_cleared(self, scope: str, ident: int) -> None:
        self._cleared[(scope, ident)] = self._cleared.get((scope, ident), 0) + 1

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
        self._mark_cleared("channel", conversation.channel_id)
        return self.history.reset(conversation)

    def reset_guild(self, guild_id: int) -> int:
        self._mark_cleared("guild", guild_id)
        return self.history.reset_guild(guild_id)

    def forget_user(self, user_id: int) -> int:
        self._mark_cleared("user", user_id)
        return self.history.forget_user(user_id)
