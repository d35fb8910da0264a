"""The engine's own decode loop against `model.generate()`: the same tokens, alone, batched, or joining late.

fp32 on the tiny model built at test time. generate() runs the same generation config on the same
loaded model, so any difference comes from the loop: its beam search, its caches, its scheduling.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.core.types import Turn
from bot.engine import Engine
from tests.conftest import engine_config
from tests.engine_spies import join_mid_reply, record_tokens

PROMPTS = [
    [Turn("user", "hello there")],
    [Turn("user", "i have a dog and two cats")],
    [Turn("user", "hi"), Turn("bot", "hello there how are you today"), Turn("user", "what do you like to do for fun")],
    [Turn("user", "tell me something interesting about space and the stars " * 4)],
    [Turn("user", "music")],
]


def model_variant(base: Path, out: Path, **generation: Any) -> Path:
    """A copy of the tiny model whose generation_config.json carries `generation` on top of its own."""
    shutil.copytree(base, out)
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(generation)
    path.write_text(json.dumps(config))
    return out


def generate_tokens(engine: Engine, history: list[Turn]) -> list[int]:
    """What `model.generate()` answers with the engine's own model and generation config, pads dropped."""
    ids = torch.tensor([engine.encode_prompt(history)])
    with torch.inference_mode():
        out = engine._model.generate(input_ids=ids, generation_config=engine._generation_config)
    pad = engine._generation_config.pad_token_id
    return [t for t in out[0, 1:].tolist() if t != pad]


CASES = {
    "greedy": dict(num_beams=1),
    "2 beams": dict(num_beams=2),
    "4 beams": dict(num_beams=4),
    "4 beams, no n-gram rule": dict(num_beams=4, no_repeat_ngram_size=0),
    "greedy, no 2-gram repeats": dict(num_beams=1, no_repeat_ngram_size=2),
    "3 beams, encoder n-grams, length penalty, early stop": dict(
        num_beams=3, encoder_no_repeat_ngram_size=2, length_penalty=0.65, early_stopping=True
    ),
    "4 beams, never stop early, longer": dict(num_beams=4, early_stopping="never", min_length=8, max_length=20),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_replies_equal_generate_alone_and_batched(tiny_model_dir: Path, tmp_path: Path, case: str) -> None:
    model_dir = model_variant(tiny_model_dir, tmp_path / "model", **CASES[case])
    async with Engine(engine_config(model_dir)) as engine:
        expected = [generate_tokens(engine, p) for p in PROMPTS]
        assert len({tuple(e) for e in expected}) > 1  # different prompts, different replies
        seen = record_tokens(engine)
        for prompt in PROMPTS:
            await engine.reply(prompt)
        assert seen == expected
        seen.clear()
        batched = await asyncio.gather(*(engine.reply(p) for p in PROMPTS))
        assert sorted(seen) == sorted(expected)
        assert list(batched) == [engine._tokenizer.decode(e, skip_special_tokens=True).strip() for e in expected]


@pytest.mark.parametrize("num_beams", [1, 4])
async def test_a_request_joining_mid_generation_gets_the_same_reply(
    tiny_model_dir: Path, tmp_path: Path, num_beams: int
) -> None:
    model_dir = model_variant(tiny_model_dir, tmp_path / "model", num_beams=num_beams, min_length=10, max_length=20)
    async with Engine(engine_config(model_dir)) as engine:
        expected = [generate_tokens(engine, p) for p in PROMPTS[:3]]
        seen = record_tokens(engine)
        blocks_per_step = await join_mid_reply(engine, PROMPTS[0], PROMPTS[1:3])
        assert blocks_per_step[:3] == [1, 1, 1] and max(blocks_per_step) >= 2, blocks_per_step
        assert sorted(seen) == sorted(expected)
