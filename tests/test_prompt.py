from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bot.core.types import Turn
from bot.engine.prompt import build_input_ids, format_turns

EOS = 2


def chars(text: str) -> list[int]:
    """One id per character: makes token counts easy to reason about."""
    return [ord(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_format_matches_blenderbot_training() -> None:
    turns = [Turn("user", "hi"), Turn("bot", "hello!"), Turn("user", "how are you?")]
    assert format_turns(turns) == " hi  hello!   how are you?"


def test_everything_kept_when_it_fits() -> None:
    turns = [Turn("user", "ab"), Turn("bot", "cd")]
    ids = build_input_ids(turns, chars, EOS, max_tokens=100)
    assert decode(ids[:-1]) == " ab  cd" and ids[-1] == EOS


def test_oldest_turns_dropped_first() -> None:
    turns = [Turn("user", "old" * 5), Turn("bot", "mid"), Turn("user", "new")]
    ids = build_input_ids(turns, chars, EOS, max_tokens=12)
    assert decode(ids[:-1]) == "mid   new"
    assert len(ids) <= 12


def test_exact_fit_keeps_all() -> None:
    turns = [Turn("bot", "abc"), Turn("user", "d")]  # "abc   d" is 7 characters, + </s> = 8
    assert len(build_input_ids(turns, chars, EOS, max_tokens=8)) == 8
    assert decode(build_input_ids(turns, chars, EOS, max_tokens=7)[:-1]) == " d"


def test_single_overlong_message_keeps_its_end() -> None:
    text = "x" * 500 + "the end"
    ids = build_input_ids([Turn("user", text)], chars, EOS, max_tokens=10)
    assert len(ids) == 10 and decode(ids[:-1]).endswith("the end") and ids[-1] == EOS


def test_rejects_impossible_budget() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        build_input_ids([Turn("user", "hi")], chars, EOS, max_tokens=1)
    with pytest.raises(ValueError, match="at least one turn"):
        build_input_ids([], chars, EOS, max_tokens=10)


@pytest.mark.parametrize("words", [1, 30, 64, 200, 2000])
def test_real_tokenizer_never_exceeds_positions(tiny_model_dir: Path, words: int) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    history = [Turn("user" if i % 2 == 0 else "bot", f"turn {i} " + "hello there " * (i % 7)) for i in range(20)]
    history.append(Turn("user", " ".join(["weather"] * words) + " final"))
    ids = build_input_ids(history, lambda t: tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id, 128)
    assert len(ids) <= 128 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]).endswith("final")  # the newest words always survive
