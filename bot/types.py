"""Plain values that cross layers; converted to Discord objects only at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "bot"]


@dataclass(frozen=True)
class Turn:
    """One message of a conversation, as the model sees it.

    `speaker` is the display name of the person who said a user turn in a server channel or thread,
    so a chat model can tell several people apart; None in DMs and for the bot's own turns.
    """

    role: Role
    text: str
    speaker: str | None = None


@dataclass(frozen=True)
class Conversation:
    """Where a message was said: a channel, thread or DM channel id, and its guild (None in a DM)."""

    channel_id: int
    guild_id: int | None = None


@dataclass(frozen=True)
class Reply:
    """What the chat service answers. `ok` is False for apologies and notices the model did not write."""

    text: str
    ok: bool = True
