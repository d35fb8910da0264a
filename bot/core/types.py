"""Plain values that cross layers; converted to Discord objects only at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "bot"]
# What a reply is: the model's answer ("ok"), or which notice was given instead; one per row of
# bot/core/outcomes.py (tests/test_outcomes.py checks the two agree).
ReplyKind = Literal["ok", "busy", "timeout", "error", "closing", "empty", "stopped"]


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
    """What the chat service answers. `ok` is False for apologies and notices the model did not write.

    `kind` says which (for the metrics); left out, it is "ok" for an answer and "error" for a notice.
    It does not take part in comparisons: two replies with the same text and `ok` are equal.
    """

    text: str
    ok: bool = True
    kind: ReplyKind | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", "ok" if self.ok else "error")
