"""First words late in a running conversation: the chat engine with its prefix cache, and without it.

Nine exchanges go through the engine first (each a ~100-token message from alice and a 60-token
reply, so the history grows to about 1,500 tokens), as they would in one Discord channel. Then the
tenth message is timed from sending until the first token of its reply, three times with
three different tenth messages (median). The same tenth prompts are timed on an engine without the
cache (PREFIX_CACHE_MB=0), which prefills the whole history each time.

Run alone: `python -m bench.conversation` (builds the random Qwen2.5-0.5B-shaped model if needed).
"""

from __future__ import annotations

import asyncio
import json
import random
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


async def first_words(engine: Any, history: list[Turn]) -> float:
    """Seconds from sending a message (its prompt not yet rendered) until the reply's first token is chosen.

    Timed at the engine's own progress callback rather than at the first streamed text: a random
    model's reply may take many tokens to decode to visible text.
    """
    from bot.engine.scheduler import Request

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    first: list[float] = []

    def progress(tokens: list[int]) -> None:  # on the engine thread
        if not first:
            first.append(time.perf_counter())

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def deliver(text: str | None, error: BaseException | None) -> None:
        loop.call_soon_threadsafe(settle)

    started = time.perf_counter()
    prompt = engine.encode_prompt(history)
    engine._scheduler.submit(Request(prompt, deliver, deadline=time.monotonic() + 600, progress=progress))
    await done
    return first[0] - started


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
    return [how, result]


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
