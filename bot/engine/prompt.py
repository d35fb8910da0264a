"""The prompt format BlenderBot was trained on, and token-exact truncation to fit the model.

transformers 5.x ships no chat template for BlenderBot: user turns are prefixed with one space, the
bot's are not, turns are joined with two spaces, and `</s>` ends the input. The encoder has a fixed
number of positions (128 for 400M-distill); anything longer raises inside the model, so history is
dropped from the oldest side until the prompt fits, and a single over-long message keeps its end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.core.types import Turn

Encode = Callable[[str], list[int]]


def format_turns(turns: Sequence[Turn]) -> str:
    """Join turns the way BlenderBot was trained, without the closing `</s>`."""
    return "  ".join((" " + t.text) if t.role == "user" else t.text for t in turns)


def build_input_ids(turns: Sequence[Turn], encode: Encode, eos_token_id: int, max_tokens: int) -> list[int]:
    """Token ids for the newest turns that fit in `max_tokens`, `</s>` included.

    `encode` must not add special tokens. Whole turns are dropped oldest first; if even the newest
    turn alone is too long, its oldest tokens are cut, so the newest words always survive.
    """
    if max_tokens < 2:
        raise ValueError("max_tokens must leave room for at least one token and </s>")
    if not turns:
        raise ValueError("a prompt needs at least one turn")
    budget = max_tokens - 1  # room for </s>
    best: list[int] | None = None
    # Grow from the newest turn backwards; tokenizing the joined text (not turns one by one) keeps
    # the count exact, since byte-level BPE merges across the whitespace between turns.
    for start in range(len(turns) - 1, -1, -1):
        ids = encode(format_turns(turns[start:]))
        if len(ids) > budget:
            break
        best = ids
    if best is None:
        best = encode(format_turns(turns[-1:]))[-budget:]
    return best + [eos_token_id]
