"""The chat service: one conversation step, the same for Discord, the console and the tests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from bot.core.engine_api import EngineError, EngineStats, ReplyEngine
from bot.core.guild_settings import PERSONA_MAX_CHARS, GuildConfig, GuildSettings, render_persona
from bot.core.outcomes import BUSY, EMPTY, FAILED, STOPPED, Outcome, outcome_of
from bot.core.types import Conversation, Reply, Turn
from bot.history import HistoryError, HistoryStore
from bot.metrics import Metrics

log = logging.getLogger(__name__)

# Shows a reply to the people in the conversation; True once they can see all of it.
Post = Callable[[Reply], Awaitable[bool]]


def notice(outcome: Outcome) -> Reply:
    """What the chat service says instead of an answer, for `outcome`."""
    assert outcome.notice is not None, outcome
    return Reply(outcome.notice, ok=False, kind=outcome.kind)


class ChatService:
    """Locks a conversation, reads its history, asks the engine, and stores both turns.

    Messages in one conversation are answered strictly in order: the next waits until the previous
    reply is in the history. Different conversations run concurrently (and batch in the engine).
    """

    def __init__(self, engine: ReplyEngine, history: HistoryStore, *, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.history = history
        self.metrics = metrics if metrics is not None else Metrics()
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        self._in_flight = 0
        self._settling = 0
        self.guilds = GuildSettings(history)  # each server's settings, shared through the history database

    @property
    def in_flight(self) -> int:
        """Conversation steps currently waiting for or running on the engine."""
        return self._in_flight

    @property
    def settling(self) -> int:
        """Replies being posted or stored right now: answered, not yet in the history."""
        return self._settling

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
        post: Post | None = None,
        system_prompt: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> Reply:
        """Answer `text` said in `conversation`. Never raises: trouble becomes a short notice.

        Each reply is counted in `metrics` by its kind, and an answer's latency observed.

        `speaker` is the display name of the person who said it in a server channel (None in DMs): it
        is stored with the turn and reaches the engine, so a chat model can tell people apart.

        `on_partial`, when the engine can stream, is called with the reply so far as it is written
        (each text extends the one before); the returned `Reply` is still the whole answer, the one
        stored, or a notice if the reply could not be finished.

        `post`, when given, shows the reply (or notice) before it is stored, still inside the
        conversation's turn: a reply is stored only once `post` says it was shown. One that could not
        be posted (Discord refused it past its retries), or whose posting was cancelled, is never
        stored, so the history holds nothing that nobody saw. Without `post` (the console) the
        caller shows what is returned.

        `system_prompt`, when given (a persona, see `persona_for`), replaces SYSTEM_PROMPT for this reply.

        `stop`, once set while the reply is written (the Stop button), ends it there: the engine's
        request is cancelled (it leaves the batch at its next step) and the text reported to
        `on_partial` so far is the reply, posted and stored like a finished one.
        """
        started = time.monotonic()
        self._in_flight += 1
        try:
            async with self._locked(conversation.channel_id):
                reply, store = await self._answer(conversation, user_id, text, speaker, on_partial, system_prompt, stop)
                # counted when the answer is ready, its latency the model's (posting is Discord's)
                self.metrics.count_reply(reply.kind or "error", time.monotonic() - started)
                self._settling += 1
                try:
                    if post is not None and not await post(reply):
                        if store is not None:
                            log.warning(
                                "a reply in channel %s could not be posted; not stored", conversation.channel_id
                            )
                        return reply
                    if store is not None:
                        # Shielded: once shown, a cancelled handler does not stop the reply being remembered.
                        await asyncio.shield(store(reply))
                    return reply
                finally:
                    self._settling -= 1
        finally:
            self._in_flight -= 1

    async def _answer(
        self,
        conversation: Conversation,
        user_id: int | None,
        text: str,
        speaker: str | None,
        on_partial: Callable[[str], None] | None,
        system_prompt: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> tuple[Reply, Callable[[Reply], Awaitable[None]] | None]:
        """The reply (or notice), and how to store it once shown (None for a notice)."""
        try:
            # The epochs say how often this channel, its server and this user were cleared so
            # far: read with the history, and checked again where the reply is stored.
            snapshot = await self.history.snapshot(conversation, user_id)
        except HistoryError:
            log.exception("could not read the history of channel %s", conversation.channel_id)
            self.metrics.history_errors.inc()
            return notice(FAILED), None
        turns = snapshot.turns + [Turn("user", text, speaker)]
        answer, failed = await self._generate(conversation, turns, on_partial, system_prompt, stop)
        if failed is not None:
            return failed, None

        async def store(reply: Reply) -> None:
            try:
                stored = await self.history.append(
                    conversation,
                    user_id,
                    Turn("user", text, speaker),
                    Turn("bot", reply.text),
                    expected=snapshot.epochs,
                )
            except HistoryError:  # the answer was still worth posting
                log.exception("could not store a reply in channel %s", conversation.channel_id)
                self.metrics.history_errors.inc()
                return
            if not stored:
                # /reset or /forget-me ran while this reply was generated (in any process): keep its promise.
                log.info("history of channel %s was cleared during a reply; not stored", conversation.channel_id)

        return Reply(answer), store

    async def _generate(
        self,
        conversation: Conversation,
        turns: list[Turn],
        on_partial: Callable[[str], None] | None,
        system_prompt: str | None,
        stop: asyncio.Event | None,
    ) -> tuple[str, Reply | None]:
        """The engine's answer to `turns`, or a notice (the second value) where there is none."""
        try:
            answer = await self._ask_engine(turns, on_partial, system_prompt, stop)
        except EngineError as exc:
            outcome = outcome_of(exc)
            if outcome is BUSY:
                log.warning("queue full; told channel %s to try again", conversation.channel_id)
            elif outcome is FAILED:  # the engine has logged the details (or they are all here)
                log.error("the engine failed to answer in channel %s: %s", conversation.channel_id, exc)
            return "", notice(outcome)
        except Exception:  # a bug: the traceback is what a developer needs
            log.exception("the engine failed to answer in channel %s", conversation.channel_id)
            return "", notice(FAILED)
        if not answer.strip():
            return "", notice(STOPPED if stop is not None and stop.is_set() else EMPTY)
        return answer, None

    async def _ask_engine(
        self,
        turns: list[Turn],
        on_partial: Callable[[str], None] | None,
        system_prompt: str | None,
        stop: asyncio.Event | None,
    ) -> str:
        """`engine.reply`; with `stop`, the text written so far once it is set (the request cancelled)."""
        if stop is None:
            return await self.engine.reply(turns, on_partial, system_prompt=system_prompt)
        written = ""

        def partial(text: str) -> None:
            nonlocal written
            written = text
            if on_partial is not None:
                on_partial(text)

        task = asyncio.ensure_future(self.engine.reply(turns, partial, system_prompt=system_prompt))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()  # the engine drops a cancelled request at its next step
            await asyncio.wait({task})
        if not task.cancelled():
            return task.result()  # finished (or failed) before the stop took
        log.info("a reply was stopped after %d characters", len(written))
        return written

    async def regenerate(
        self,
        conversation: Conversation,
        user_id: int | None,
        old: str,
        *,
        on_partial: Callable[[str], None] | None = None,
        post: Post,
        system_prompt: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> Reply | None:
        """Answer the conversation's newest question again, replacing the bot's newest turn (`old`).

        None, with nothing asked or posted, when there is nothing to regenerate: the newest turn is not
        the bot's answer `old` to a question (a reset, or the conversation moved on). Otherwise like
        `respond`: the new reply (or a notice) goes to `post`, and only a reply `post` showed replaces
        `old` in the history (`replace_last_reply`, which a reset in between refuses). Never raises.
        """
        started = time.monotonic()
        self._in_flight += 1
        try:
            async with self._locked(conversation.channel_id):
                try:
                    snapshot = await self.history.snapshot(conversation, user_id)
                except HistoryError:
                    log.exception("could not read the history of channel %s", conversation.channel_id)
                    self.metrics.history_errors.inc()
                    reply = notice(FAILED)
                    await post(reply)
                    return reply
                turns = snapshot.turns
                if len(turns) < 2 or turns[-1] != Turn("bot", old) or turns[-2].role != "user":
                    return None
                answer, failed = await self._generate(conversation, turns[:-1], on_partial, system_prompt, stop)
                reply = failed or Reply(answer)
                self.metrics.count_reply(reply.kind or "error", time.monotonic() - started)
                self._settling += 1
                try:
                    if not await post(reply) or failed is not None:
                        return reply
                    replace = self.history.replace_last_reply(
                        conversation, user_id, old, reply.text, expected=snapshot.epochs
                    )
                    try:
                        if not await asyncio.shield(replace):
                            log.info("channel %s changed during a regeneration; not stored", conversation.channel_id)
                    except HistoryError:
                        log.exception("could not store a regenerated reply in channel %s", conversation.channel_id)
                        self.metrics.history_errors.inc()
                    return reply
                finally:
                    self._settling -= 1
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

    def persona_for(
        self, config: GuildConfig, channel_id: int, *, parent_id: int | None, server: str, channel: str
    ) -> str | None:
        """The system prompt for a reply in a server channel or thread with settings `config` (from
        `guilds.get`): the channel's persona (a thread's own, else its parent channel's), else the
        server's, with `{server}`, `{channel}` and `{date}` filled in; None (the engine's SYSTEM_PROMPT)
        when neither has one."""
        template, _ = config.persona_for(channel_id, parent_id)
        return None if template is None else render_persona(template, server=server, channel=channel)

    async def check_persona(self, rendered: str) -> str | None:
        """Why a persona (placeholders filled) cannot be used, with the numbers; None when it can."""
        if len(rendered) > PERSONA_MAX_CHARS:
            return f"it is {len(rendered)} characters long, and a persona may have at most {PERSONA_MAX_CHARS}"
        return await self.engine.check_system_prompt(rendered)

    @property
    def uses_personas(self) -> bool:
        """Whether the model reads a system prompt at all (BlenderBot does not)."""
        return self.engine.uses_system_prompt

    def turn_away(self, outcome: Outcome) -> Reply:
        """The notice for a message answered without asking the engine (the bot is stopping), counted as such."""
        self.metrics.count_reply(outcome.kind)
        return notice(outcome)

    def engine_stats(self) -> EngineStats:
        """The engine's numbers (model, queue, latency), for /stats."""
        return self.engine.stats()

    async def reset(self, conversation: Conversation) -> int:
        """Forget one conversation, here and in every process sharing the history; raises `HistoryError`."""
        return await self.history.reset(conversation)

    async def reset_guild(self, guild_id: int) -> int:
        """Forget every conversation of a server; raises `HistoryError`."""
        return await self.history.reset_guild(guild_id)

    async def forget_user(self, user_id: int) -> int:
        """Delete every turn written by or to one person; raises `HistoryError`.

        The engine's kept keys/values of finished conversations go too: they are computed from
        everybody's words, and there is no telling which hold this person's.
        """
        removed = await self.history.forget_user(user_id)
        dropped = self.engine.forget_cached_conversations()
        log.info("forgot a user: %d turns, %d cached conversations", removed, dropped)
        return removed
