"""The chat-model part of `make bench`: a full-size random Qwen2.5-0.5B-Instruct, naive path vs engine.

Greedy decoding (SAMPLING off) and fixed reply lengths, so both paths do the same work: random
weights never end a reply on their own.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench import bandwidth, continuous, conversation, memory, openloop, workload
from bench.threads import in_own_thread
from bot.core.types import Turn

REPLY = 60  # tokens of the timed replies
SPACING_S = 0.25
SYSTEM_PROMPT = "You are a friendly bot in a Discord server."


def engine_config(model_dir: Path, tokens: int) -> Any:
    from bot.engine import EngineConfig

    return EngineConfig(
        model_name=str(model_dir),
        device="cpu",
        precision="auto",
        min_new_tokens=tokens,
        max_new_tokens=tokens,
        sampling=False,
        system_prompt=SYSTEM_PROMPT,
        max_queue=256,
    )


def long_history(engine: Any, tokens_wanted: int, first_word: int = 0) -> list[Turn]:
    """One message from alice whose rendered prompt is the first to reach `tokens_wanted` tokens.

    Messages with different `first_word`s differ from their first word, so the prefix cache holds
    none of one for another (only the system prompt they share)."""
    words = workload.WORDS
    count = 1
    while True:
        text = " ".join(words[(first_word + i) % len(words)] for i in range(count))
        history = [Turn("user", text, speaker="alice")]
        if len(engine.encode_prompt(history)) >= tokens_wanted:
            return history
        count += 1


async def measure_engine(model_dir: Path, out: dict[str, Any]) -> None:
    from bot.engine import Engine

    result = out["engine"] = {}
    for tokens in (20, REPLY):
        async with Engine(engine_config(model_dir, tokens)) as engine:
            out["precision"] = engine.precision
            result[f"single_{tokens}_s"] = await median_single_reply(engine)
            if tokens != REPLY:
                continue
            spaced = [i * SPACING_S for i in range(16)]
            result["spaced_16"] = await openloop.send_over_time(engine.reply, spaced, seed=3)
            histories = [long_history(engine, 300, first_word) for first_word in (0, 1, 2)]  # none cached
            out["first_words_prompt_tokens"] = len(engine.encode_prompt(histories[0]))
            result["first_words_s"] = sorted([await first_words(engine, h) for h in histories])[1]


async def median_single_reply(engine: Any) -> float:
    """Seconds for one reply, alone: the median of three, after a warm-up reply."""
    await engine.reply(workload.conversations(1, seed=99)[0])
    times = []
    for i in range(3):
        started = time.perf_counter()
        await engine.reply(workload.conversations(1, seed=100 + i)[0])
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


async def first_words(engine: Any, history: list[Turn]) -> float:
    """Seconds from sending a message until the first words of its reply are out (streamed)."""
    started = time.perf_counter()
    seen: list[float] = []

    def partial(text: str) -> None:
        if not seen:
            seen.append(time.perf_counter() - started)

    await engine.reply(history, partial)
    return seen[0]


def measure_naive(model_dir: Path, out: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def reply(history: list[Turn], tokens: int) -> float:
        messages = [{"role": "user" if t.role == "user" else "assistant", "content": t.text} for t in history]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=torch.tensor([ids]), do_sample=False, min_new_tokens=tokens, max_new_tokens=tokens)
        return time.perf_counter() - started

    reply(workload.conversations(1, seed=99)[0], 5)  # warm-up (maps the weights in)
    out["naive"] = {"single_60_s": reply(workload.conversations(1, seed=100)[0], REPLY)}


def run(model_dir: Path, bandwidth_gbs: float, log: Any) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    config = json.loads((model_dir / "config.json").read_text())
    asyncio.run(measure_engine(model_dir, out))
    log(f"chat engine: {out['engine']['single_60_s']:.2f}s for a {REPLY}-token reply")
    out["conversation"] = asyncio.run(conversation.measure(model_dir))
    log("\n".join(conversation.summary(out["conversation"])).strip())
    in_own_thread(measure_naive, model_dir, out)  # see bench.threads
    log(f"chat naive: {out['naive']['single_60_s']:.2f}s for a {REPLY}-token reply")
    out["serving"] = memory.measure_load(model_dir, "chat_serve_16")
    out["continuous_batching"] = continuous.compare(model_dir, REPLY, SYSTEM_PROMPT)
    log("\n".join(continuous.summary(out["continuous_batching"])).strip())
    eng, naive = out["engine"], out["naive"]
    weights = bandwidth.causal_bytes_per_token(config, 1)
    floor_ms = weights / (bandwidth_gbs * 1e9) * 1000
    step_ms = (eng[f"single_{REPLY}_s"] - eng["single_20_s"]) / (REPLY - 20) * 1000
    spaced = eng["spaced_16"]["all_answered_s"]
    out["floor_ms_per_token_int8"] = floor_ms
    auto = next(j for j in out["conversation"]["joining"] if j["chunk"] is None)
    out["greedy_ms_per_token"] = step_ms
    out["goals"] = [
        (f"one {REPLY}-token reply: x faster than naive", naive["single_60_s"] / eng["single_60_s"], ">= 3"),
        (
            f"16 messages {SPACING_S}s apart: all answered, x sooner than naive sequential",
            16 * naive["single_60_s"] / spaced if spaced else None,
            ">= 8",
        ),
        (
            f"time to the first words, {out['first_words_prompt_tokens']}-token prompt (s)",
            eng["first_words_s"],
            "<= 1.5",
        ),
        (
            f"first words at turn {conversation.TURNS} of a running conversation, prefix cache (s)",
            out["conversation"]["cached_median_s"],
            "<= 0.8",
        ),
        (
            (
                f"while a {out['conversation']['prompt_tokens'][0]}-token prompt joins by the measured budget, "
                "a running reply's longest step / its normal step"
            ),
            auto["longest_step_s"] / auto["normal_step_s"],
            "<= 2",
        ),
        (f"greedy ms per token / bandwidth floor ({floor_ms:.1f} ms)", step_ms / floor_ms, "<= 2"),
        (
            "peak RSS serving 16 conversations, int8 (MB)",
            out["serving"].get("peak_rss_serving_mb"),
            "< 1500",
        ),
    ]
    return out


def summary(out: dict[str, Any]) -> list[str]:
    eng, naive, serving = out["engine"], out["naive"]["single_60_s"], out["serving"]
    spaced = openloop_fmt(eng["spaced_16"]["all_answered_s"])
    single, short, first = eng["single_60_s"], eng["single_20_s"], eng["first_words_s"]
    step, floor = out["greedy_ms_per_token"], out["floor_ms_per_token_int8"]
    steady, peak = serving.get("steady_rss_mb", 0), serving.get("peak_rss_serving_mb", 0)
    lines = [
        f"chat model (Qwen2.5-0.5B-Instruct shape, random weights), greedy, {out['precision']}:",
        f"  one {REPLY}-token reply: naive fp32 {naive:.2f}s, engine {single:.2f}s (20 tokens: {short:.2f}s)",
        f"  16 messages {SPACING_S}s apart: all answered in {spaced}s (naive: 16 x one reply = {16 * naive:.1f}s)",
        f"  first words of a reply to a {out['first_words_prompt_tokens']}-token prompt: {first:.2f}s",
        f"  greedy decoding: {step:.1f} ms per token (floor {floor:.1f})",
        f"  memory: steady {steady:.0f} MB, serving 16 conversations {peak:.0f} MB",
    ]
    lines += conversation.summary(out["conversation"])
    lines += continuous.summary(out["continuous_batching"])
    for name, value, goal in out["goals"]:
        lines.append(f"  goal: {name}: {'n/a' if value is None else f'{value:.2f}'} (goal {goal})")
    return lines


def openloop_fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
