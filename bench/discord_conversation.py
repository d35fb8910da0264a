"""A long conversation through Discord: is a late reply as quick as a first one?

The real bot (`ChatBot` and its cogs, the chat service, the history store, the engine) runs against
the fake Discord the tests use, on the random Qwen2.5-0.5B-shaped model in int8, with the bot's
defaults (HISTORY_TURNS 12, the prefix cache, chunked prefill) and greedy 60-token replies. Streaming
is off, so a reply's time is from the message reaching Discord to the bot's one post: the whole
answer, prefill and decoding. One person sends `TURNS` messages of ~100 words in one channel, each
after the previous answer; then one message of the same length in a fresh channel. The measure is
the median of the last three turns' times over the fresh channel's.

Run alone: `python -m bench.discord_conversation` (builds the model if needed; about 3 minutes).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import workload

TURNS = 14
MESSAGE_WORDS = 100
REPLY = 60
TIMEOUT_S = 300.0


def message(rng: random.Random) -> str:
    return " ".join(rng.choice(workload.WORDS) for _ in range(MESSAGE_WORDS))


async def measure(model_dir: Path) -> dict[str, Any]:
    import discord
    import yarl
    from discord.gateway import DiscordWebSocket

    from tests.fake_discord import FakeDiscord, bot_settings
    from tests.fake_discord.harness import start_bot

    rng = random.Random(7)
    out: dict[str, Any] = {"turns": [], "fresh_s": None}
    with tempfile.TemporaryDirectory() as tmp:
        async with FakeDiscord() as fake:
            discord.http.Route.BASE = fake.api_base
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
            settings = bot_settings(
                fake,
                model_dir,
                Path(tmp) / "history.sqlite3",
                precision="int8",
                stream_replies=False,
                sampling=False,
                min_new_tokens=REPLY,
                max_new_tokens=REPLY,
                generation_timeout_seconds=TIMEOUT_S,
                reply_buttons_seconds=0.0,
            )
            harness = await start_bot(fake, settings, ready_timeout=600.0)
            try:
                w = fake.world
                for turn in range(1, TURNS + 1):
                    started = time.perf_counter()
                    await fake.ask(w.member, w.general, message(rng), timeout=TIMEOUT_S)
                    out["turns"].append(time.perf_counter() - started)
                    print(f"  turn {turn:2d}: {out['turns'][-1]:.2f} s", flush=True)
                fresh = await fake.add_text_channel("fresh")
                started = time.perf_counter()
                await fake.ask(w.member, fresh, message(rng), timeout=TIMEOUT_S)
                out["fresh_s"] = time.perf_counter() - started
            finally:
                await harness.stop()
    late = statistics.median(out["turns"][-3:])
    out["late_s"], out["ratio"] = late, late / out["fresh_s"]
    return out


def summary(out: dict[str, Any]) -> list[str]:
    return [
        (
            f"through Discord, {TURNS} turns of {MESSAGE_WORDS}-word messages in one channel, {REPLY}-token greedy"
            " replies, int8, streaming off (message to the bot's post):"
        ),
        f"  fresh channel, first message: {out['fresh_s']:.2f} s",
        (
            f"  late in the conversation (median of turns {TURNS - 2}-{TURNS}): {out['late_s']:.2f} s"
            f" = {out['ratio']:.2f}x the first (goal: at most 1.5x)"
        ),
    ]


def main() -> None:
    from bench import bandwidth
    from bench.build import build_chat_model

    model_dir = build_chat_model()
    gbs = bandwidth.measure_bandwidth_gbs()
    out = asyncio.run(measure(model_dir))
    out["bandwidth_gbs"] = gbs
    print(f"memory bandwidth: read {gbs['read']:.1f} GB/s, copy {gbs['copy']:.1f} GB/s")
    for line in summary(out):
        print(line)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "discord_conversation.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
