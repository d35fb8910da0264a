"""Conversations read once: the prefix cache (bot/engine/prefix_cache.py) alone, in the causal runner, and
through the engine, where a reply with the cache must be token for token the reply without it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.core.types import Turn
from bot.engine import Engine, causal, chat_prompt, kernel
from bot.engine.chat_prompt import build_chat_ids, render_chat_ids
from bot.engine.prefix_cache import PrefixCache, common_prefix
from tests.engine_spies import record_tokens
from tests.test_engine_causal import chat_config

# --- the cache alone -------------------------------------------------------------------------------


def states(tokens: int, fill: float = 0.0) -> torch.Tensor:
    """Keys/values of `tokens` positions of a 1-layer, 1-head, 2-dim model: 16 bytes a position."""
    return torch.full((2, 1, 1, tokens, 2), fill)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([5], [1]) == 0
    assert common_prefix([], [1]) == 0
    long = list(range(1000))
    for cut in (0, 1, 499, 998, 999):
        assert common_prefix(long, [*long[:cut], -1, *long[cut + 1 :]]) == cut


def test_longest_prefix_wins_and_no_false_match() -> None:
    cache = PrefixCache(max_bytes=10_000)
    cache.keep([1, 2, 3], 3, states(3, 1.0))
    cache.keep([1, 2, 7, 8, 9], 5, states(5, 2.0))
    entry, length = cache.lookup([1, 2, 7, 8, 5, 6])
    assert entry is not None and length == 4 and entry.tokens == [1, 2, 7, 8, 9]
    entry, length = cache.lookup([1, 2, 3, 4])
    assert entry is not None and length == 3 and float(entry.states[0, 0, 0, 0, 0]) == 1.0
    assert cache.lookup([2, 1, 3]) == (None, 0)  # a different first token: nothing is shared
    assert cache.lookup([]) == (None, 0)


def test_least_recently_used_go_first_within_the_byte_bound() -> None:
    cache = PrefixCache(max_bytes=16 * 10)  # ten positions
    assert cache.keep([1, 1, 1, 1], 4, states(4))
    assert cache.keep([2, 2, 2, 2], 4, states(4))
    cache.lookup([1, 1, 9])  # the first is now the most recently used
    assert cache.keep([3, 3, 3, 3], 4, states(4))
    assert [e.tokens[0] for e in cache.entries()] == [1, 3] and cache.nbytes == 16 * 8 <= cache.max_bytes
    assert not cache.keep(list(range(11)), 11, states(11))  # bigger than the whole cache: not kept
    assert len(cache) == 2 and cache.counters.evicted == 1


def test_a_later_turn_supersedes_the_earlier_one_but_not_other_conversations() -> None:
    cache = PrefixCache(max_bytes=10_000)
    cache.keep([9, 1, 2, 3], 3, states(4))  # channel A, turn 1: prompt [9, 1, 2], reply so far [3]
    cache.keep([9, 5, 6], 3, states(3))  # channel B shares only the "system prompt" 9
    cache.keep([9, 1, 2, 4, 5, 6], 5, states(6))  # channel A, turn 2 re-renders its reply as [4]
    assert [e.tokens for e in cache.entries()] == [[9, 5, 6], [9, 1, 2, 4, 5, 6]]


def test_a_pinned_entry_is_never_evicted_nor_superseded() -> None:
    cache = PrefixCache(max_bytes=16 * 6)
    assert cache.keep([7, 7], 2, states(2), pinned=True)
    assert cache.keep([7, 7, 1, 1], 4, states(4))
    assert cache.keep([7, 7, 2, 2], 4, states(4))  # evicts [7, 7, 1, 1], not the pinned one
    assert [e.tokens for e in cache.entries()] == [[7, 7], [7, 7, 2, 2]]
    assert not cache.keep([1] * 5, 5, states(5))  # more than the room the pinned entry leaves
    assert cache.clear(keep_pinned=True) == 1  # /forget-me: the system prompt's prefix holds nobody's words
    assert [e.tokens for e in cache.entries()] == [[7, 7]]
    assert cache.clear() == 1
    assert len(cache) == 0 and cache.nbytes == 0


# --- in the runner ----------------------------------------------------------------------------------


async def test_a_cached_prefill_fills_the_row_as_a_whole_prefill_does(tiny_chat_model_dir: Path) -> None:
    """Only the shared positions come from the cache: a prompt that diverges gets its own keys after that."""
    async with (
        Engine(chat_config(tiny_chat_model_dir, prefix_cache_mb=0)) as plain,
        Engine(chat_config(tiny_chat_model_dir)) as cached,
    ):
        history = [Turn("user", "hello there how are you", speaker="alice")]
        other = [Turn("user", "hello there who are you", speaker="alice")]
        first, second = cached.encode_prompt(history), cached.encode_prompt(other)
        shared = common_prefix(first, second)
        assert 0 < shared < len(second) - 1
        await cached.reply(history)
        await plain.reply(history)  # both engines idle again: their runners may be used from here
        runner, reference = cached._scheduler.runner, plain._scheduler.runner
        before = runner.prefix_cache.counters.reused_tokens
        block = runner.add_block(second)
        assert runner.prefix_cache.counters.reused_tokens - before == shared
        reference_block = reference.add_block(second)
        n = len(second) - 1
        for mine, theirs in zip((*runner.keys, *runner.values), (*reference.keys, *reference.values), strict=True):
            torch.testing.assert_close(mine[block, :, :n], theirs[reference_block, :, :n], rtol=1e-5, atol=1e-5)
        runner.remove_block(block)
        reference.remove_block(reference_block)


# --- through the engine -----------------------------------------------------------------------------

MESSAGES = [
    "hello there, how are you today",
    "do you have any pets at home",
    "tell me something interesting about space",
    "what music do you like",
    "i am fine thank you",
    "what is your favourite colour",
]


async def converse(engine: Engine, channels: int, turns: int, *, together: bool = False) -> list[list[Turn]]:
    """Run `channels` conversations of `turns` messages each, channel after channel or all at once per turn."""
    histories: list[list[Turn]] = [[] for _ in range(channels)]
    for turn in range(turns):
        for c, history in enumerate(histories):
            history.append(Turn("user", MESSAGES[(turn + 2 * c) % len(MESSAGES)], speaker=f"user{c}"))
        if together:
            replies = await asyncio.gather(*(engine.reply(h) for h in histories))
        else:
            replies = [await engine.reply(h) for h in histories]
        for history, reply in zip(histories, replies, strict=True):
            history.append(Turn("bot", reply))
    return histories


@pytest.mark.parametrize("in_place", [True, False], ids=["attending in place", "through the model's forward"])
async def test_replies_with_the_cache_equal_replies_without_it(
    tiny_chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    """The fp32 oracle: a multi-turn conversation in three channels, then histories that changed (a reset,
    an edited turn): every reply token for token the uncached engine's, with most positions not re-read.
    Both ways of reading new tokens after a cached past are held to it."""
    if not in_place:
        monkeypatch.setattr(causal, "IN_PLACE_SCORES", 0)
    tokens: list[list[list[int]]] = []
    for cache_mb in (0, None):
        async with Engine(chat_config(tiny_chat_model_dir, prefix_cache_mb=cache_mb)) as engine:
            seen = record_tokens(engine)
            histories = await converse(engine, channels=3, turns=5)
            edited = [*histories[0][:2], Turn("user", "something else entirely"), *histories[0][3:-1]]
            reset = [Turn("user", histories[0][0].text, speaker="user0")]
            for history in (edited, reset, histories[1][:-3], histories[2][:-1]):
                await engine.reply(history)
            tokens.append(seen)
            cache = engine._scheduler.runner.prefix_cache
            if cache is not None:
                counters = cache.counters
                # every prompt reuses the system prompt, read at startup (lookup 0); from turn 2 on,
                # each reuses at least its channel's previous prompt
                assert min(counters.history[1:4]) >= len(cache.entries()[0].tokens) > 0
                assert min(counters.history[4:16]) > 40, counters.history
                assert counters.prefilled_tokens < counters.reused_tokens / 2
    assert tokens[0] == tokens[1]
    assert len({tuple(t) for t in tokens[0]}) > 3


@pytest.mark.skipif(not kernel.available(), reason="the C decoder layers need the int8 kernel")
async def test_with_the_c_layers_a_cached_prompt_is_bitwise_the_prompt_read_whole(tiny_chat_model_dir: Path) -> None:
    """int8 through the C layers: a token's keys/values are the same whether a decoding step or a
    prefill computed them, so the cache changes no bit, and replies are token for token."""
    tokens: list[list[list[int]]] = []
    slabs = []
    for cache_mb in (0, None):
        async with Engine(chat_config(tiny_chat_model_dir, precision="int8", prefix_cache_mb=cache_mb)) as engine:
            runner = engine._scheduler.runner
            assert runner.native is not None
            seen = record_tokens(engine)
            histories = await converse(engine, channels=2, turns=4)
            tokens.append(seen)
            prompt = engine.encode_prompt([*histories[0], Turn("user", "and one more thing", speaker="user0")])
            block = runner.add_block(prompt)
            slabs.append([slab[block, :, : len(prompt) - 1].clone() for slab in (*runner.keys, *runner.values)])
            runner.remove_block(block)
            if cache_mb is None:
                assert runner.prefix_cache.counters.reused_tokens > runner.prefix_cache.counters.prefilled_tokens
    assert tokens[0] == tokens[1]
    assert all(torch.equal(a, b) for a, b in zip(*slabs, strict=True))


async def test_int8_batched_equals_one_at_a_time_with_the_cache(tiny_chat_model_dir: Path) -> None:
    results = []
    for together in (False, True):
        async with Engine(chat_config(tiny_chat_model_dir, precision="int8")) as engine:
            results.append(await converse(engine, channels=4, turns=4, together=together))
            counters = engine._scheduler.runner.prefix_cache.counters
            # lookup 0 is the system prompt's own prefill at startup; every prompt after it reuses some
            assert counters.history[0] == 0 and counters.hits == counters.lookups - 1
            assert counters.reused_tokens > counters.prefilled_tokens
    assert results[0] == results[1]
    assert len({t.text for h in results[0] for t in h if t.role == "bot"}) > 4


# --- the history cut keeps prefixes stable ------------------------------------------------------------


def appended_turns(tokenizer: Any, budget: int) -> tuple[int, int]:
    """Grow a 60-turn conversation; of the prompts cut to the budget, how many start with the one before."""
    rng = random.Random(5)
    turns: list[Turn] = []
    previous: list[int] = []
    cut = appended = 0
    for i in range(30):
        turns.append(Turn("user", " ".join(rng.choices(MESSAGES, k=2)), speaker=rng.choice(["ann", "bo"])))
        ids = build_chat_ids(tokenizer, turns, system_prompt="Be nice.", budget=budget)
        whole = render_chat_ids(tokenizer, turns, system_prompt="Be nice.")
        if len(whole) > budget and i:
            cut += 1
            appended += common_prefix(previous, ids) == len(previous)
        previous = ids
        turns.append(Turn("bot", MESSAGES[i % len(MESSAGES)]))
    return appended, cut


def test_a_conversation_outgrowing_its_budget_keeps_its_prefix_for_several_turns(
    tiny_chat_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_model_dir))
    appended, cut = appended_turns(tokenizer, budget=250)
    assert cut >= 20 and appended >= cut * 0.4, (appended, cut)
    monkeypatch.setattr(chat_prompt, "MIN_KEPT_SHARE", 2.0)  # no start keeps enough: the fewest dropped
    fewest, cut = appended_turns(tokenizer, budget=250)
    assert fewest <= cut // 5 < appended, (fewest, appended, cut)


async def test_forgetting_drops_every_kept_conversation(tiny_chat_model_dir: Path) -> None:
    async with Engine(chat_config(tiny_chat_model_dir)) as engine:
        history = [Turn("user", "hello there", speaker="alice")]
        reply = await engine.reply(history)
        cache = engine._scheduler.runner.prefix_cache
        assert len(cache) == 2  # the system prompt's prefix and this conversation
        # the system prompt's prefix holds nobody's words: it stays
        assert engine.forget_cached_conversations() == 1 and len(cache) == 1
        (system,) = cache.entries()
        assert system.pinned
        assert await engine.reply(history) == reply  # read again past the system prompt, the same reply
        assert cache.counters.history[-1] == len(system.tokens)
