"""`python -m bench.choose_model` (or `make bench-models`): the README's "Choosing a model" table.

For each model, in one run: build its full-size random copy (cached in bench/.cache), count its
parameters, measure the memory of a fresh process serving it as int8 (loaded, answering one
conversation, answering 16 at once), time one 60-token greedy reply through the engine, and divide
its decoding step by the memory-bandwidth floor measured at the start of the same run. Replies are
greedy and exactly 60 tokens long, so every model does the same work whatever its weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench import bandwidth, memory
from bench.build import BENCH_DIR, CACHE_DIR, build_chat_model, build_model
from bench.chat_bench import median_single_reply

RESULTS = BENCH_DIR / "results"
REPLY = 60  # tokens of the timed reply
SHORT = 20  # tokens of the shorter reply; the difference gives the time of one decoding step
SYSTEM_PROMPT = "You are a friendly bot in a Discord server."


@dataclass(frozen=True)
class Candidate:
    hub_id: str
    build: Callable[[], Path]


def _chat(spec: str, cache: str) -> Callable[[], Path]:
    return lambda: build_chat_model(CACHE_DIR / cache, BENCH_DIR / "models" / spec)


MODELS: dict[str, Candidate] = {
    "blenderbot-400m-distill": Candidate("facebook/blenderbot-400M-distill", build_model),
    "qwen2.5-0.5b-instruct": Candidate("Qwen/Qwen2.5-0.5B-Instruct", build_chat_model),
    "smollm2-360m-instruct": Candidate(
        "HuggingFaceTB/SmolLM2-360M-Instruct", _chat("smollm2-360m-instruct", "smollm2-360m-random")
    ),
    "qwen3-0.6b": Candidate("Qwen/Qwen3-0.6B", _chat("qwen3-0.6b", "qwen3-0.6b-random")),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_bytes(config: dict[str, Any]) -> float:
    """int8 weight bytes one greedy decoding step reads (BlenderBot: its decoder; others: the whole model)."""
    if config.get("is_encoder_decoder"):
        return bandwidth.decoder_bytes_per_token(config, 1)
    return bandwidth.causal_bytes_per_token(config, 1)


async def reply_times(model_dir: Path) -> dict[str, Any]:
    """Median of three greedy replies of `SHORT` and of `REPLY` tokens, one conversation at a time."""
    from bot.engine import Engine, EngineConfig

    out: dict[str, Any] = {}
    for tokens in (SHORT, REPLY):
        config = EngineConfig(
            model_name=str(model_dir),
            device="cpu",
            precision="int8",
            num_beams=1,
            min_new_tokens=tokens,
            max_new_tokens=tokens,
            sampling=False,
            system_prompt=SYSTEM_PROMPT,
        )
        async with Engine(config) as engine:
            out["precision"] = engine.precision
            out[f"reply_{tokens}_s"] = await median_single_reply(engine)
    return out


def measure(name: str, bandwidth_gbs: float) -> dict[str, Any]:
    candidate = MODELS[name]
    started = time.monotonic()
    model_dir = candidate.build()
    built = json.loads((model_dir / "BENCH_MODEL.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    log(f"{name}: model ready at {model_dir} ({time.monotonic() - started:.0f}s)")
    row: dict[str, Any] = {"model": name, "hub_id": candidate.hub_id, "parameters": built["parameters"]}
    row["memory"] = memory.measure_load(model_dir, "greedy_serve_16", timeout=600)
    row.update(asyncio.run(reply_times(model_dir)))
    row["tokens_per_s"] = REPLY / row[f"reply_{REPLY}_s"]
    row["step_ms"] = (row[f"reply_{REPLY}_s"] - row[f"reply_{SHORT}_s"]) / (REPLY - SHORT) * 1000
    row["step_weights_mb"] = step_bytes(config) / 1e6
    row["floor_ms"] = step_bytes(config) / (bandwidth_gbs * 1e9) * 1000
    row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
    log(f"{name}: {format_row(row)}")
    return row


def _mb(memory_result: dict[str, Any], key: str) -> str:
    value = memory_result.get(key)
    return "n/a" if value is None else f"{value:.0f}"


def format_row(row: dict[str, Any]) -> str:
    mem = row["memory"]
    if "error" in mem:
        return f"memory not measured: {mem['error'].strip().splitlines()[-1]}"
    return (
        f"{row['parameters'] / 1e6:.0f}M parameters; RSS loaded {_mb(mem, 'rss_after_load_mb')} MB, "
        f"one reply {_mb(mem, 'peak_rss_one_reply_mb')} MB, 16 at once {_mb(mem, 'peak_rss_serving_mb')} MB; "
        f"{REPLY}-token reply {row[f'reply_{REPLY}_s']:.2f}s ({row['tokens_per_s']:.1f} tokens/s); "
        f"step {row['step_ms']:.1f} ms = {row['step_over_floor']:.1f}x the floor ({row['floor_ms']:.1f} ms)"
    )


def table(rows: list[dict[str, Any]], bw: float) -> list[str]:
    header = (
        f"{'model':<36} | {'params':>7} | {'RSS loaded':>10} {'1 reply':>8} {'16 at once':>10} | "
        f"{f'{REPLY} tokens':>10} {'tok/s':>6} | {'step ms':>7} {'floor ms':>8} {'x floor':>7}"
    )
    intro = (
        f"int8 on the CPU, greedy, {REPLY}-token replies; memory: RSS of a fresh process in MB; "
        f"floor: int8 weights a step reads / {bw:.1f} GB/s"
    )
    lines = [
        intro,
        header,
        "-" * len(header),
    ]
    for r in rows:
        mem = r["memory"]
        lines.append(
            f"{r['hub_id']:<36} | {r['parameters'] / 1e9:>6.2f}B | {_mb(mem, 'rss_after_load_mb'):>10} "
            f"{_mb(mem, 'peak_rss_one_reply_mb'):>8} {_mb(mem, 'peak_rss_serving_mb'):>10} | "
            f"{r[f'reply_{REPLY}_s']:>9.2f}s {r['tokens_per_s']:>6.1f} | {r['step_ms']:>7.1f} "
            f"{r['floor_ms']:>8.1f} {r['step_over_floor']:>6.1f}x"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.choose_model", description=__doc__)
    parser.add_argument(
        "--model",
        action="append",
        choices=sorted(MODELS),
        help="measure only this model (repeatable); default: every model",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    names = args.model or list(MODELS)
    started = time.monotonic()
    bw = bandwidth.measure_bandwidth_gbs()
    log(f"memory bandwidth: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s")
    rows = [measure(name, bw["best"]) for name in names]
    lines = [*table(rows, bw["best"]), f"total {time.monotonic() - started:.0f}s"]
    print("\n".join(lines), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"bandwidth_gbs": bw, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "models": rows}
    (RESULTS / "choose_model.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "choose_model.txt").write_text("\n".join(lines) + "\n")
    log(f"wrote {RESULTS / 'choose_model.json'} and choose_model.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
