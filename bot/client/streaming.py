"""Showing a reply while the model writes it: post the first words, then edit the message as more arrive.

Discord side only (it posts and edits messages); it knows nothing of the model. `cogs/chat.py` hands
`StreamingReply.update` to the chat service as its `on_partial` callback, then calls `finish` with
the finished reply. Every post and edit carries `AllowedMentions.none()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import discord

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters in one Discord message
EDIT_INTERVAL_SECONDS = 1.2  # at most one write (post or edit) per message this often
FIRST_POST_AFTER_SECONDS = 1.0  # without a whole sentence yet, the first words go up this long after the first
CUT_OFF_NOTE = "\n\n*(I was cut off here. Please ask again.)*"

# What posting may raise once discord.py has given up: Discord refused (HTTP errors, 5xx past its
# retries), or could not be reached at all.
POST_ERRORS = (discord.HTTPException, aiohttp.ClientError, OSError)

# A sentence end ('.', '!', '?' or a line break) after at least two words: worth showing on its own.
_SENTENCE = re.compile(r"\S+\s+\S[^.!?\n]*[.!?\n]")


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Cut text into pieces Discord accepts, preferring line breaks, then spaces.

    Greedy from the start: a piece depends only on the text up to `limit + 1` characters past its
    own start, so a text that only grows keeps the pieces it already had, except its last.
    """
    chunks: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = rest.rfind("\n", 0, limit + 1)
        if cut < limit // 2:
            cut = rest.rfind(" ", 0, limit + 1)
        if cut < limit // 2:
            cut = limit
        chunks.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        chunks.append(rest)
    return chunks


def has_sentence(text: str) -> bool:
    """Whether `text` already holds a sentence end after a few words (so its first words are worth posting)."""
    return _SENTENCE.search(text) is not None


class StreamingReply:
    """One reply to `message`, shown while it is written.

    `update(text)` records the reply so far (the whole text each time, each extending the last); it
    is cheap and synchronous, so the chat service can call it on every new word. A writer task posts
    the first words once they hold a sentence, or `first_after` seconds after the first text came,
    then edits that message with the newest text, at most once per `interval` seconds per message
    (the texts in between are skipped, never queued). Past `limit` characters the message gets its
    final piece (cut like `split_message`) and the text goes on in a new message; only the first
    message is a reply to `message`.

    `finish(text, ok=...)` ends it: the messages are edited to the finished text (the final edit too
    waits out the interval), or, for a reply that failed after some of it was posted, the text so
    far gets `CUT_OFF_NOTE`. A reply that finishes before anything was posted (short replies, replies
    not streamed at all, notices) is posted the ordinary way, once, without edits.

    `after` is awaited before the first post, so replies in one channel appear in order. `clock` and
    `sleep` are the time source and the way to wait (a test passes a fake clock's).

    `buttons(index, count, state)` gives the buttons message `index` of `count` should carry, `state`
    being "writing", "done" or "failed" (a notice, or cut off); every post and edit carries them, and
    a message is edited when only its buttons change. `reuse` is a message of the bot's that the reply
    replaces (Regenerate): it is edited in place of the first post.
    """

    def __init__(
        self,
        message: discord.Message,
        *,
        after: asyncio.Future[None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        interval: float = EDIT_INTERVAL_SECONDS,
        first_after: float = FIRST_POST_AFTER_SECONDS,
        limit: int = MESSAGE_LIMIT,
        buttons: Callable[[int, int, str], discord.ui.View | None] | None = None,
        reuse: discord.Message | None = None,
    ) -> None:
        self.message = message
        self.after = after
        self.clock = clock
        self.sleep = sleep
        self.interval = interval
        self.first_after = first_after
        self.limit = limit
        self.posts: list[discord.Message] = []  # what has been posted, in order
        self.shown: list[str] = []  # the text each of them shows now
        self.written_at: list[float] = []  # when each was last posted or edited
        self._text = ""  # the newest partial text
        self._first_at: float | None = None  # when the first partial text came
        self._final: tuple[str, bool] | None = None
        self._streamed = False  # something was posted before the reply was complete
        self._news = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._quiet = discord.AllowedMentions.none()
        self.refused = False  # Discord refused a post or an edit: the reply is not all shown
        self.buttons = buttons
        self.shown_buttons: list[str | None] = []  # which buttons each message carries now
        if reuse is not None:  # edited at the first write, however it reads now
            self.posts.append(reuse)
            self.shown.append("\x00")
            self.written_at.append(-math.inf)
            self.shown_buttons.append("\x00")

    @property
    def streamed(self) -> bool:
        """Whether some of the reply was shown before it was complete."""
        return self._streamed

    # ----- called by the cog -----------------------------------------------------------------

    def update(self, text: str) -> None:
        """The reply so far; called on the event loop, possibly once per word."""
        if self._final is not None or not text.strip():
            return
        self._text = text
        if self._first_at is None:
            self._first_at = self.clock()
        self._start()
        self._news.set()

    async def finish(self, text: str, *, ok: bool) -> bool:
        """The reply is done: `text` is the whole reply (`ok`) or a notice. Returns once it is shown:
        True if all of it is, False if Discord refused a post or an edit."""
        if self._final is None:
            self._final = (text, ok)
        self._news.set()
        self._start()
        assert self._writer is not None
        await self._writer
        return not self.refused

    def cancel(self) -> None:
        """Stop writing (the reply's handler is going away); harmless once finished."""
        if self._writer is not None:
            self._writer.cancel()

    # ----- the writer ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            await self._wait_for_first_words()
            if self.after is not None:
                await asyncio.wait({self.after})
            await self._show()
        except POST_ERRORS as exc:
            self.refused = True
            log.warning("could not post in channel %s: %s", self.message.channel.id, exc)

    async def _wait_for_first_words(self) -> None:
        """Until the text holds a sentence, `first_after` seconds have passed since it started, or the end."""
        while self._final is None:
            self._news.clear()
            assert self._first_at is not None  # the writer starts at the first text or at the end
            remaining = self._first_at + self.first_after - self.clock()
            if remaining <= 0 or has_sentence(self._text):
                return
            news = asyncio.ensure_future(self._news.wait())
            nap = asyncio.ensure_future(self.sleep(remaining))
            try:
                await asyncio.wait({news, nap}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                news.cancel()
                nap.cancel()

    async def _show(self) -> None:
        """Bring the posted messages up to the newest text, one write at a time, until the end is shown."""
        while True:
            self._news.clear()
            pieces = self._pieces()
            views = [self._view(i, len(pieces)) for i in range(len(pieces))]
            keys = [getattr(view, "key", None) for view in views]
            index = next(
                (
                    i
                    for i, piece in enumerate(pieces)
                    if i >= len(self.shown) or self.shown[i] != piece or self.shown_buttons[i] != keys[i]
                ),
                None,
            )
            if index is None:
                if self._final is not None:
                    return
                await self._news.wait()
                continue
            if index >= len(self.posts):
                await self._post(pieces[index], views[index])
                continue
            wait = self.written_at[index] + self.interval - self.clock()
            if wait > 0:
                await self.sleep(wait)  # then look again: only the newest text is sent
                continue
            self._streamed = self._streamed or self._final is None
            if self.buttons is not None:
                self.posts[index] = await self.posts[index].edit(
                    content=pieces[index], allowed_mentions=self._quiet, view=views[index]
                )
            else:
                self.posts[index] = await self.posts[index].edit(content=pieces[index], allowed_mentions=self._quiet)
            self.shown[index] = pieces[index]
            self.shown_buttons[index] = keys[index]
            self.written_at[index] = self.clock()

    def _view(self, index: int, count: int) -> discord.ui.View | None:
        if self.buttons is None:
            return None
        state = "writing" if self._final is None else "done" if self._final[1] else "failed"
        return self.buttons(index, count, state)

    def _pieces(self) -> list[str]:
        """What the messages should show now, one piece per message."""
        if self._final is None:
            return split_message(self._text, self.limit)
        text, ok = self._final
        if ok or not self._streamed:
            return split_message(text, self.limit)
        # It failed after some of it was posted: keep what was written, and say it stops there.
        pieces = split_message(self._text, self.limit)
        if len(pieces[-1]) + len(CUT_OFF_NOTE) <= self.limit:
            pieces[-1] += CUT_OFF_NOTE
        else:
            pieces.append(CUT_OFF_NOTE.strip())
        return pieces

    async def _post(self, piece: str, view: discord.ui.View | None = None) -> None:
        first = not self.posts
        self._streamed = self._streamed or self._final is None
        reference = self.message.to_reference(fail_if_not_exists=False) if first else None
        options: dict[str, Any] = {"reference": reference, "allowed_mentions": self._quiet, "mention_author": False}
        if view is not None:
            options["view"] = view
        posted = await self.message.channel.send(piece, **options)
        self.posts.append(posted)
        self.shown.append(piece)
        self.shown_buttons.append(getattr(view, "key", None))
        self.written_at.append(self.clock())
        if self._final is None:
            await self._keep_typing()

    async def _keep_typing(self) -> None:
        """A new message from the bot hides its typing indicator; show it again while the reply goes on."""
        try:
            await self.message.channel.typing()
        except Exception as exc:  # noqa: BLE001 - the indicator is cosmetic; the reply must still be posted
            log.debug("no typing indicator: %s", exc)
