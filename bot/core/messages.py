"""A conversation as a chat model's messages, and the reasoning blocks its answers may carry.

Shared by the in-process engine (which renders these messages with the model's chat template) and
the remote engine (which sends them to an OpenAI-compatible server), so both read a conversation the
same way: the system prompt first, a server user's turn as `Name: text`, one role after the other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bot.core.types import Turn

Message = dict[str, str]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# A reasoning block: closed, or still open at the end of the text.
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?(?:" + re.escape(THINK_CLOSE) + r"|\Z)", re.DOTALL)


def _content(turn: Turn) -> str:
    if turn.role == "user" and turn.speaker:
        return f"{turn.speaker}: {turn.text}"
    return turn.text


def chat_messages(turns: Sequence[Turn], *, system_prompt: str) -> list[Message]:
    """The messages for `apply_chat_template`: system first (if any), roles merged, user first."""
    messages: list[Message] = []
    for turn in turns:
        role = "user" if turn.role == "user" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + _content(turn)
        elif messages or role == "user":  # an answer whose question was dropped opens nothing
            messages.append({"role": role, "content": _content(turn)})
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def strip_think(text: str) -> str:
    """`text` without reasoning blocks (`<think>...</think>`, or an unclosed `<think>` to the end),
    stripped of surrounding whitespace: the answer to post and store."""
    return _THINK_BLOCK.sub("", text).strip()


def visible_so_far(text: str) -> str:
    """What may be shown of a reply still being written: `strip_think`, except that nothing from an
    unclosed `<think>` on is shown, nor the start of a `<think>` tag still arriving (`"<th"`).

    Each result is a prefix of the results for longer texts, and of `strip_think` of the whole
    reply, so a message edited as the reply streams in only ever grows.
    """
    for size in range(len(THINK_OPEN) - 1, 0, -1):
        if text.endswith(THINK_OPEN[:size]):  # perhaps a tag on its way: wait for the next token
            text = text[:-size]
            break
    return _THINK_BLOCK.sub("", text).strip()
