"""The buttons on the bot's replies: Stop while a reply is written, Regenerate on the newest finished one.

Custom ids are `stop:<asker>:<question>` and `regen:<asker>:<question>` (the ids of the person who asked
and of their message), so a press is understood whatever the bot remembers: after a restart too. The
views built here are never stored in discord.py's view store (`is_dispatchable` is False): presses
reach `cogs/buttons.py` through `on_interaction`, which looks the reply up on the `ReplyBoard`.

`ReplyBoard` remembers, per channel, the newest reply (the only one Regenerate may replace) and every
reply still being written (which Stop may end). A newer reply in the channel, once finished, supersedes
the one before it (its buttons are taken off); a finished reply's Regenerate lasts `seconds`
(REPLY_BUTTONS_SECONDS).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import discord

from bot.core.types import Conversation

log = logging.getLogger(__name__)

STOP, REGENERATE = "stop", "regen"
CUSTOM_ID = re.compile(r"(stop|regen):(\d{1,20}):(\d{1,20})")

NOT_YOURS_TEXT = "Only the person who asked (or someone with Manage Messages) can use these buttons."
EXPIRED_TEXT = "This button has expired. Ask me again if you'd like a new answer."
NOTHING_TO_REGENERATE_TEXT = "There's nothing to regenerate: this conversation was reset or has moved on."
ALREADY_DONE_TEXT = "That reply is already finished."
BUSY_WRITING_TEXT = "I'm already writing a new answer there."


def custom_id(action: str, asker_id: int, question_id: int) -> str:
    return f"{action}:{asker_id}:{question_id}"


def parse_custom_id(value: str) -> tuple[str, int, int] | None:
    """(action, asker id, question id) of one of these buttons; None for any other custom id."""
    match = CUSTOM_ID.fullmatch(value)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


class ReplyView(discord.ui.View):
    """The buttons of one message (Stop, or Regenerate). Only serialised: never in the view store."""

    def __init__(self, action: str, asker_id: int, question_id: int) -> None:
        super().__init__(timeout=None)
        self.key = action
        label, emoji = ("Stop", "\u23f9\ufe0f") if action == STOP else ("Regenerate", "\U0001f504")
        self.add_item(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                label=label,
                emoji=emoji,
                custom_id=custom_id(action, asker_id, question_id),
            )
        )

    def is_dispatchable(self) -> bool:
        return False  # presses go to on_interaction (cogs/buttons.py), before and after a restart


@dataclass(eq=False)
class ReplyRecord:
    """One reply of the bot's, as its buttons need it."""

    conversation: Conversation
    asker_id: int
    question_id: int
    system_prompt: str | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    writing: bool = True
    text: str | None = None  # the text shown (and stored) once finished
    message: discord.Message | None = None  # its one message, when Regenerate may replace it
    timer: asyncio.TimerHandle | None = None
    seq: int = 0  # the order replies began in, on this board


class ReplyBoard:
    """The replies whose buttons still work. `remove_buttons(message)` takes a message's buttons away."""

    def __init__(self, seconds: float, remove_buttons: Callable[[discord.Message], object]) -> None:
        self.seconds = seconds
        self._remove_buttons = remove_buttons
        self._newest: dict[int, ReplyRecord] = {}  # channel -> its newest reply
        self._records: dict[int, ReplyRecord] = {}  # question id -> a reply still live (newest or writing)
        self._count = 0

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def begin(self, record: ReplyRecord) -> ReplyRecord:
        """A new reply in its channel (Stop works on it from now on)."""
        self._count += 1
        record.seq = self._count
        self._records[record.question_id] = record
        return record

    def find(self, question_id: int) -> ReplyRecord | None:
        return self._records.get(question_id)

    def is_newest(self, record: ReplyRecord) -> bool:
        return self._newest.get(record.conversation.channel_id) is record

    def superseded(self, record: ReplyRecord) -> bool:
        """Whether a reply that began after this one has finished in its channel."""
        newest = self._newest.get(record.conversation.channel_id)
        return newest is not None and newest.seq > record.seq

    def view_for(self, record: ReplyRecord, action: str | None) -> ReplyView | None:
        if action is None or not self.enabled:
            return None
        return ReplyView(action, record.asker_id, record.question_id)

    def finished(self, record: ReplyRecord, text: str | None, message: discord.Message | None) -> None:
        """The reply is done: `text` shown and stored (None: a notice, or nothing kept), in `message`
        when it is one message with Regenerate on it."""
        record.writing = False
        record.text = text
        record.message = message
        if self.superseded(record):
            self._forget(record)
            return
        channel = record.conversation.channel_id
        previous = self._newest.get(channel)
        self._newest[channel] = record
        if previous is not None and previous is not record:
            self._supersede(previous)
        if text is None or message is None:
            self._forget(record)
            return
        if record.timer is not None:
            record.timer.cancel()
        if math.isfinite(self.seconds):
            record.timer = asyncio.get_running_loop().call_later(self.seconds, self._expire, record)

    def regenerating(self, record: ReplyRecord) -> None:
        """Regenerate was pressed: the reply is being written again (Stop works again, Regenerate waits)."""
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        record.writing = True
        record.stop = asyncio.Event()

    def message_deleted(self, message_id: int) -> None:
        """One of the bot's messages was deleted: a reply in it has no buttons left to edit."""
        for record in list(self._records.values()) + list(self._newest.values()):
            if record.message is not None and record.message.id == message_id:
                record.message = None
                if not record.writing:
                    self._forget(record)

    def _supersede(self, record: ReplyRecord) -> None:
        if record.writing:
            return  # its own last write leaves Regenerate off (it is no longer the newest); Stop still works
        self._forget(record)
        if record.message is not None:
            self._remove_buttons(record.message)

    def _expire(self, record: ReplyRecord) -> None:
        record.timer = None
        if record.writing or self._records.get(record.question_id) is not record:
            return
        self._forget(record)
        if record.message is not None:
            self._remove_buttons(record.message)

    def _forget(self, record: ReplyRecord) -> None:
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        if self._records.get(record.question_id) is record:
            del self._records[record.question_id]
        channel = record.conversation.channel_id
        if self._newest.get(channel) is record and not record.writing and record.message is None:
            del self._newest[channel]

    def close(self) -> None:
        for record in self._records.values():
            if record.timer is not None:
                record.timer.cancel()
        self._records.clear()
        self._newest.clear()
