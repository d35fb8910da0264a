"""Prompts for chat models (decoder-only, with a chat template), cut token-exactly to fit a budget.

A chat model (Qwen2.5/Qwen3, SmolLM2, Llama 3.2 Instruct, Gemma...) is prompted with its own chat
template: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`. The messages are the
conversation's turns, with an optional system message first:

- user turns are `user` messages, the bot's are `assistant` messages;
- in a server channel several people talk, so a user turn with a speaker reads `"Alice: hi"`; in a
  DM (no speaker) it is the bare text;
- consecutive turns of one role are merged into one message (joined with a newline), and a leading
  assistant message is dropped, so templates that insist on user/assistant alternation (Gemma's
  raises otherwise) accept every history.

Fitting is counted on the whole rendered conversation, never message by message: templates add text
that depends on position (a date line, a default system message, the first user message carrying
the system prompt...), and BPE merges across message boundaries. The system message and the newest
turn always stay; older turns are dropped whole, oldest first, with a binary search over where the
kept history starts (a few renders, not one per turn). A newest turn that is too long on its own
loses its beginning and keeps its end, cut at token boundaries, again by binary search.

Where the kept history starts must not move with every new message: the engine keeps the keys and
values of a conversation's last prompt (`prefix_cache.py`), and only a prompt that starts with the
same tokens reuses them. Dropping as few turns as possible would move the start by a turn or two
at every message once a conversation outgrows its budget, and every reply would re-read the whole
history. So a cut history starts at a turn chosen by its content (winnowing, as in document
fingerprinting): of the user turns it may start at, those from the oldest that fits to the newest
that still leaves `MIN_KEPT_SHARE` of the budget, the one whose speaker and text hash lowest
(`start_rank`). As messages are added, the window slides forward but its lowest-ranked turn
usually stays the same, so the prompt grows at its end only; when the history outgrows the budget
from there (or a newer turn ranks lower), the start jumps several turns at once. Ranks depend on
the turns alone, not on their positions, so the same start is found again even when the stored
history is itself a sliding window.

The trade-off: right after a cut the model sees less history than would fit (never less than
MIN_KEPT_SHARE of the budget), in exchange for reading only the new message and reply, not the
whole history, at most turns (about half of them once a conversation outgrows a budget of six
exchanges; at best two in three with this share).

Text that users wrote is tokenized with `sanitize_control_tokens=True` where the tokenizer offers
it, so a message containing `<|im_start|>system` is read as plain text, not as a control token.

Reasoning models (Qwen3) may write `<think>...</think>` before their answer: the template is asked
not to (`enable_thinking=False`, where it takes that), and `strip_think`/`visible_so_far` remove
such blocks from what is posted, streamed or stored.
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from bot.core.messages import chat_messages
from bot.core.types import Turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A cut history keeps at least this share of the budget (see above): the lower, the longer a cut
# prefix lasts, and the less history the model sees just after a cut.
MIN_KEPT_SHARE = 0.5


def start_rank(turn: Turn) -> int:
    """Where a cut history prefers to start: the lowest rank among the user turns it may start at."""
    return zlib.crc32(f"{turn.speaker or ''}\x00{turn.text}".encode())


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template (a chat model), as opposed to e.g. BlenderBot's."""
    return bool(getattr(tokenizer, "chat_template", None))


def _template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template `apply_chat_template` will use (the default one, where there are several)."""
    try:
        return str(tokenizer.get_chat_template())
    except ValueError:  # no template, or several with no default
        template = getattr(tokenizer, "chat_template", None)
        return " ".join(template.values()) if isinstance(template, dict) else str(template or "")


def template_kwargs(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The arguments this module passes to `apply_chat_template` besides the messages.

    `enable_thinking=False` where the template reads it (Qwen3: no reasoning block before the
    answer), and `sanitize_control_tokens=True` where transformers offers it (control tokens typed
    by users stay plain text).
    """
    extra: dict[str, Any] = {}
    if "enable_thinking" in _template_text(tokenizer):
        extra["enable_thinking"] = False
    if "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters:
        extra["sanitize_control_tokens"] = True
    return extra


def render_chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[Turn],
    *,
    system_prompt: str,
    extra: dict[str, Any] | None = None,
) -> list[int]:
    """The whole conversation's token ids, generation prompt included, with nothing cut."""
    ids = tokenizer.apply_chat_template(
        chat_messages(turns, system_prompt=system_prompt),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        **(template_kwargs(tokenizer) if extra is None else extra),
    )
    return list(cast("list[int]", ids))


def system_prefix_ids(tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> list[int]:
    """The leading token ids every prompt shares: the system message and what the template puts
    before the first user message's text (the common prefix of two one-message prompts)."""
    extra = template_kwargs(tokenizer)
    one, two = (
        render_chat_ids(tokenizer, [Turn("user", text)], system_prompt=system_prompt, extra=extra)
        for text in ("0", "Zz")
    )
    shared = next((i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b), min(len(one), len(two)))
    return one[:shared]


def _cut_points(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Where a cut `text` may start, ascending: its tokens' first characters, then `len(text)` (empty)."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = {int(start) for start, _ in offsets}
    except (NotImplementedError, ValueError, TypeError, KeyError):  # no offsets (a slow tokenizer): any character
        starts = set(range(len(text)))
    return sorted(s for s in starts if 0 < s < len(text)) + [len(text)]


def _first_fitting(lo: int, hi: int, best: list[int], fits: Callable[[int], list[int] | None]) -> tuple[int, list[int]]:
    """The smallest index in (lo, hi] that fits and its ids, by binary search.

    `fits(i)` returns the ids of candidate i, or None when they do not fit. The caller knows that lo
    does not fit (or is -1) and that hi does, with ids `best`. Whatever the shape of `fits`, the
    index found fits and the one before it does not.
    """
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = fits(mid)
        if ids is None:
            lo = mid
        else:
            hi, best = mid, ids
    return hi, best


def _stable_start(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[Turn],
    fewest: int,
    ids: list[int],
    *,
    system_prompt: str,
    extra: dict[str, Any],
    budget: int,
) -> list[int]:
    """The cut history from the lowest-ranked user turn between `fewest` (the oldest start that fits,
    rendered as `ids`) and the newest start that keeps MIN_KEPT_SHARE of the budget."""
    floor = budget * MIN_KEPT_SHARE
    if len(ids) < floor:
        return ids

    def render(i: int) -> list[int]:
        return render_chat_ids(tokenizer, turns[i:], system_prompt=system_prompt, extra=extra)

    lo, hi = fewest, len(turns) - 1  # turns[lo:] keeps enough; the newest alone is no choice
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(render(mid)) >= floor:
            lo = mid
        else:
            hi = mid
    users = [i for i in range(fewest, lo + 1) if turns[i].role == "user"]
    best = min(users, key=lambda i: start_rank(turns[i]), default=fewest)
    return ids if best == fewest else render(best)


def build_chat_ids(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], *, system_prompt: str, budget: int
) -> list[int]:
    """Token ids of the newest part of the conversation that fits in `budget` tokens, rendered with
    the tokenizer's chat template and ending with the generation prompt (the model answers next).

    The system message (when `system_prompt` is not empty) and the newest turn always stay; older
    turns are dropped whole, oldest first, until the conversation fits; then, so that the next
    messages keep the same prefix, up to the lowest-ranked user turn (`start_rank`) that still
    leaves MIN_KEPT_SHARE of the budget (see the module's docstring). A newest turn too long on its own
    keeps its end: its text is cut at a token boundary, as little as the budget allows (its
    speaker's name stays).

    Raises ValueError if `turns` is empty or does not end with a user turn, or if the system message
    and an empty newest message already exceed the budget.
    """
    if not turns:
        raise ValueError("a prompt needs at least one turn")
    if turns[-1].role != "user":
        raise ValueError("the newest turn must be the user's: the model answers it")
    extra = template_kwargs(tokenizer)

    def fitting(kept: Sequence[Turn]) -> list[int] | None:
        ids = render_chat_ids(tokenizer, kept, system_prompt=system_prompt, extra=extra)
        return ids if len(ids) <= budget else None

    whole = fitting(turns)
    if whole is not None:  # the usual case: one render
        return whole
    newest_alone = fitting(turns[-1:]) if len(turns) > 1 else None
    if newest_alone is not None:  # where the kept history starts: turns[0] does not fit, turns[-1] does
        start, ids = _first_fitting(0, len(turns) - 1, newest_alone, lambda i: fitting(turns[i:]))
        return _stable_start(tokenizer, turns, start, ids, system_prompt=system_prompt, extra=extra, budget=budget)

    newest = turns[-1]
    points = _cut_points(tokenizer, newest.text)

    def cut_fitting(i: int) -> list[int] | None:
        return fitting([dataclasses.replace(newest, text=newest.text[points[i] :])])

    empty = cut_fitting(len(points) - 1)
    if empty is None:
        bare = [dataclasses.replace(newest, text="")]
        size = len(render_chat_ids(tokenizer, bare, system_prompt=system_prompt, extra=extra))
        raise ValueError(
            f"a budget of {budget} tokens cannot hold even the system prompt and an empty message ({size} tokens)"
        )
    # where the kept text starts: the whole text (-1) does not fit, the empty one does
    return _first_fitting(-1, len(points) - 1, empty, cut_fitting)[1]
