"""First words late in a running conversation: the chat engine with its prefix cache, and without it.

Nine exchanges go through the engine first (each a ~100-token message from alice and a 60-token
reply, so the history grows to about 1,500 tokens), as they would in one Discord channel. Then the
tenth message is timed from sending until the first token of its reply, three times with
three different tenth messages (median). The same tenth prompts are timed on an engine without the
cache (PREFIX_CACHE_MB=0), which prefills the whole history each time.

Then chunked prefill: a 60-token reply is running when the first tenth prompt (uncached) is sent;
the running reply's step times and the long prompt's first token are measured with the prompt read
at once (chunks off), by the measured budget (`PREFILL_CHUNK_TOKENS=auto`, the default) and in
chunks of 16 tokens per step.

Run alone: `python -m bench.conversation` (builds the random Qwen2.5-0.5B-shaped model if needed).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

from bench import workload
from bot.core.types import Turn

TURNS = 10  # the timed message is the tenth
MESSAGE_WORDS = 50  # about 90 tokens with the bench's tokenizer
REPLY = 60
SYSTEM_PROMPT = "You are a friendly bot in a Discord server."


def engine_config(model_dir: Path, cache_mb: int | None) -> Any:
    from bot.engine import EngineConfig

    return EngineConfig(
        model_name=str(model_dir),
        device="cpu",
        precision="auto",
        min_new_tokens=REPLY,
        max_new_tokens=REPLY,
        sampling=False,
        system_prompt=SYSTEM_PROMPT,
        prefix_cache_mb=cache_mb,
        generation_timeout_seconds=600.0,
    )


def message(rng: random.Random) -> Turn:
    return Turn("user", " ".join(rng.choice(workload.WORDS) for _ in range(MESSAGE_WORDS)), speaker="alice")


def send(
    engine: Any, history: list[Turn], fifth: threading.Event | None = None
) -> tuple[asyncio.Future[None], list[float], float]:
    """Submit a reply to `history`; returns its completion, the times each of its tokens was chosen
    (filled in on the engine thread; `fifth` is set at the fifth), and when it was sent (before its
    prompt was rendered)."""
    from bot.engine.scheduler import Request

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    stamps: list[float] = []

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def deliver(text: str | None, error: BaseException | None) -> None:
        loop.call_soon_threadsafe(settle)

    def progress(tokens: list[int]) -> None:
        stamps.append(time.perf_counter())
        if fifth is not None and len(stamps) == 5:
            fifth.set()

    started = time.perf_counter()
    prompt = engine.encode_prompt(history)
    engine._scheduler.submit(Request(prompt, deliver, deadline=time.monotonic() + 600, progress=progress))
    return done, stamps, started


async def first_words(engine: Any, history: list[Turn]) -> float:
    """Seconds from sending a message (its prompt not yet rendered) until the reply's first token is chosen.

    Timed at the engine's own progress callback rather than at the first streamed text: a random
    model's reply may take many tokens to decode to visible text.
    """
    done, stamps, started = send(engine, history)
    await done
    return stamps[0] - started


async def joining(model_dir: Path, long: list[Turn], chunk: int | None) -> dict[str, Any]:
    """A 60-token reply runs; after its 5th token the long prompt (uncached) is sent. How long do the
    running reply's steps take while the long one is read in (against the median of its first four),
    how many take over 2x, and when does the long one's first token come?"""
    from dataclasses import replace

    from bot.engine import Engine

    async with Engine(replace(engine_config(model_dir, 0), prefill_chunk_tokens=chunk)) as engine:
        await engine.reply(long[:1])  # warm-up
        done, stamps, _ = send(engine, long[:1], fifth := threading.Event())
        await asyncio.to_thread(fifth.wait, 60)
        long_done, long_stamps, sent = send(engine, long)
        await long_done
        await done
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    normal = sorted(gaps[:4])[2]
    # the running reply's steps that ended while the long prompt was being read in
    joining_gaps = [b - a for a, b in itertools.pairwise(stamps) if sent < b <= long_stamps[0]]
    return {
        "chunk": chunk,
        "normal_step_s": normal,
        "longest_step_s": max(joining_gaps, default=0.0),
        "steps_while_joining": len(joining_gaps),
        "steps_over_2x": sum(gap > 2 * normal for gap in joining_gaps),
        "long_first_token_s": long_stamps[0] - sent,
    }


async def measure(model_dir: Path) -> dict[str, Any]:
    from bot.engine import Engine

    rng = random.Random(10)
    history: list[Turn] = []
    out: dict[str, Any] = {"turn": TURNS, "reply_tokens": REPLY}
    async with Engine(engine_config(model_dir, None)) as engine:
        out["precision"] = engine.precision
        for _ in range(TURNS - 1):
            history.append(message(rng))
            history.append(Turn("bot", await engine.reply(history)))
        tenth = [[*history, message(rng)] for _ in range(3)]
        out["prompt_tokens"] = [len(engine.encode_prompt(h)) for h in tenth]
        counters = engine._scheduler.runner.prefix_cache.counters
        before = (counters.reused_tokens, counters.prefilled_tokens)
        out["cached_s"] = [await first_words(engine, h) for h in tenth]
        out["cached_reused_tokens"] = counters.reused_tokens - before[0]
        out["cached_prefilled_tokens"] = counters.prefilled_tokens - before[1]
    async with Engine(engine_config(model_dir, 0)) as engine:
        await engine.reply(history[:1])  # warm-up
        out["uncached_s"] = [await first_words(engine, h) for h in tenth]
    out["joining"] = [await joining(model_dir, tenth[0], chunk) for chunk in (0, None, 16)]
    out["cached_median_s"] = sorted(out["cached_s"])[1]
    out["uncached_median_s"] = sorted(out["uncached_s"])[1]
    return out


def summary(out: dict[str, Any]) -> list[str]:
    tokens = out["prompt_tokens"]
    how = (
        f"  first words at turn {out['turn']} of a running conversation ({min(tokens)}-{max(tokens)}-token prompts, "
        f"{out['precision']}, median of 3 tenth messages after 9 exchanges through the engine):"
    )
    result = (
        f"    with the prefix cache {out['cached_median_s']:.2f}s "
        f"(prefilled {out['cached_prefilled_tokens']} tokens, reused {out['cached_reused_tokens']}); "
        f"without {out['uncached_median_s']:.2f}s"
    )
    lines = [how, result]
    for j in out.get("joining", []):
        longest, normal = j["longest_step_s"], j["normal_step_s"]
        how_read = {0: "at once", None: "by the measured budget (auto)"}.get(j["chunk"], f"{j['chunk']} tokens a step")
        lines.append(
            f"    while a {tokens[0]}-token prompt joins a running reply, read {how_read}"
            f": the running reply's longest step {longest:.2f}s "
            f"({longest / normal:.1f}x its normal {normal * 1000:.0f} ms; "
            f"{j['steps_over_2x']} of its {j['steps_while_joining']} steps meanwhile over 2x); "
            f"the joining reply's first token after {j['long_first_token_s']:.2f}s"
        )
    return lines


def main() -> None:
    import logging
    import warnings

    import torch

    from bench import bandwidth
    from bench.build import build_chat_model

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    model_dir = build_chat_model()
    gbs = bandwidth.measure_bandwidth_gbs()
    out = asyncio.run(measure(model_dir))
    out["bandwidth_gbs"], out["torch_threads"] = gbs, torch.get_num_threads()
    print(json.dumps(out, indent=2))
    print(f"memory bandwidth: read {gbs['read']:.1f} GB/s, copy {gbs['copy']:.1f} GB/s; {out['torch_threads']} threads")
    print("\n".join(summary(out)))


if __name__ == "__main__":
    main()
