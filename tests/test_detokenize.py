"""Streamed text decoded a few tokens at a time equals decoding the whole reply, on the tests' tokenizers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bot.engine.detokenize import IncrementalText
from tests.tiny_model import CORPUS

TEXTS = [
    "Hello there! How are you doing today? I'm fine , thanks .",
    "Ünïcödé wörds, emoji 🙂🚀 and 漢字 split across byte-level tokens.",
    "  leading spaces, line\nbreaks\n\nand   runs of spaces  ",
]


@pytest.fixture(params=["blenderbot", "chat"])
def tokenizer(request: pytest.FixtureRequest, tiny_model_dir: Path, tiny_chat_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir if request.param == "blenderbot" else tiny_chat_model_dir)


@pytest.mark.parametrize("text", TEXTS + [CORPUS[0], " ".join(CORPUS[:5])])
def test_every_step_is_a_prefix_and_the_end_is_the_whole_decode(tokenizer: object, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    whole = tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    decoded = IncrementalText(tokenizer)
    seen = ""
    rng = random.Random(0)
    end = 0
    while end < len(ids):
        end = min(len(ids), end + rng.choice([1, 1, 1, 2, 3]))  # a report may come after several steps
        so_far = decoded.update(ids[:end])
        assert so_far.startswith(seen) and whole.startswith(so_far), (so_far, whole)
        assert "\ufffd" not in so_far
        seen = so_far
    assert decoded.update(ids + [tokenizer.eos_token_id]) == whole  # type: ignore[attr-defined]


def test_each_report_decodes_a_window_not_the_whole_reply(tiny_chat_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    ids = tokenizer(" ".join(CORPUS[:20]), add_special_tokens=False)["input_ids"]
    lengths: list[int] = []
    decode = tokenizer.decode

    def counting(tokens: list[int], **kwargs: object) -> str:
        lengths.append(len(tokens))
        return str(decode(tokens, **kwargs))

    tokenizer.decode = counting  # type: ignore[method-assign]
    decoded = IncrementalText(tokenizer)
    for end in range(1, len(ids) + 1):
        decoded.update(ids[:end])
    assert len(ids) > 50
    assert max(lengths) < 10, max(lengths)
