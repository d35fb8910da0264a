"""`python -m bench.llama_cpp --bin DIR --gguf FILE`: the engine against llama.cpp on this machine, in one run.

The engine side is the int8 `CausalRunner` with the C layers on the random Qwen2.5-0.5B-shaped model
(`bench.build`), bf16 slabs; llama.cpp's side is its own `llama-bench` and `llama-batched-bench` on a
GGUF of the same weights, with the same thread count. Measured, medians of `--rounds`:

- prefill of a 300-token prompt;
- a decoding step at 300-360 positions (60 steps after that prompt; llama-bench's `tg60 @ d300`);
- one reply: the prompt and its 60 tokens;
- 16 conversations at once: 16 prompts of 300 tokens, then 60 steps of all 16.

The memory bandwidth is probed before and after. llama.cpp is not a dependency of the project: build
it yourself (`cmake -B build && cmake --build build -t llama-bench llama-batched-bench llama-quantize`)
and make the GGUF from the bench model with its `convert_hf_to_gguf.py --outtype q8_0` (the bench's
tokenizer is not Qwen's, so tell the converter's pre-tokenizer check it is `qwen2`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench import bandwidth
from bench.build import build_chat_model
from bench.step import load_int8, make_runner

PROMPT, REPLY, MANY = 300, 60, 16


def engine_round(runner: Any, vocab: int, seed: int) -> dict[str, float]:
    """One round of every measure on the engine, in seconds (the step in milliseconds)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def prompt() -> list[int]:
        return torch.randint(0, vocab, (PROMPT + 1,), generator=generator).tolist()

    def decode(rows: int) -> list[float]:
        tokens = torch.zeros(rows, dtype=torch.long)
        positions = torch.full((rows,), PROMPT)
        times = []
        for _ in range(REPLY):
            began = time.perf_counter()
            tokens = runner.step(tokens, positions).argmax(-1)
            times.append(time.perf_counter() - began)
            positions = positions + 1
        return times

    runner.reset()
    began = time.perf_counter()
    runner.add_block(prompt())
    prefill = time.perf_counter() - began
    steps = decode(1)
    runner.reset()
    began = time.perf_counter()
    for _ in range(MANY):
        runner.add_block(prompt())
    decode(MANY)
    many = time.perf_counter() - began
    runner.reset()
    return {
        "prefill_s": prefill,
        "step_ms": statistics.median(steps) * 1000,
        "reply_s": prefill + sum(steps),
        "many_s": many,
    }


def _output(*command: str | Path) -> str:
    return subprocess.run([str(part) for part in command], check=True, capture_output=True, text=True).stdout


def llama_round(binaries: Path, gguf: Path, threads: int) -> dict[str, float]:
    """The same measures by llama.cpp's own benchmarks (one repetition each)."""
    common = ["-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    prompt_rows = json.loads(_output(binaries / "llama-bench", *common, "-p", str(PROMPT), "-n", "0"))
    pp = next(r for r in prompt_rows if r["n_prompt"] == PROMPT)["avg_ts"]
    step_rows = json.loads(_output(binaries / "llama-bench", *common, "-p", "0", "-n", str(REPLY), "-d", str(PROMPT)))
    tg = next(r for r in step_rows if r["n_gen"] == REPLY)["avg_ts"]
    sizes = ["-c", str(MANY * (PROMPT + REPLY + 8)), "-b", "2048", "-ub", "512"]
    shape = ["-npp", str(PROMPT), "-ntg", str(REPLY), "-npl", str(MANY), "--output-format", "jsonl"]
    batched = _output(binaries / "llama-batched-bench", "-m", gguf, "-t", str(threads), *sizes, *shape)
    result = next(json.loads(line) for line in batched.splitlines() if line.startswith("{"))
    return {
        "prefill_s": PROMPT / pp,
        "step_ms": 1000 / tg,
        "reply_s": PROMPT / pp + REPLY / tg,
        "many_s": float(result["t"]),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin folder")
    parser.add_argument("--gguf", type=Path, required=True, help="the bench model as GGUF (Q8_0)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    from bot.engine import kernel

    model_dir = build_chat_model()
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    runner = make_runner(load_int8(model_dir, use_kernel=True), blocks=MANY, max_length=2048)
    assert runner.native is not None, "the C decoder layers are not available here"
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; kernel: {kernel.status()}", flush=True)
    engine_round(runner, vocab, seed=99)  # warm-up

    bw_before = bandwidth.measure_bandwidth_gbs()
    rounds: dict[str, list[dict[str, float]]] = {"engine": [], "llama.cpp": []}
    for i in range(args.rounds):
        rounds["engine"].append(engine_round(runner, vocab, seed=i))
        rounds["llama.cpp"].append(llama_round(args.bin, args.gguf, threads))
        print(f"round {i + 1}: {json.dumps(rounds)}", flush=True)
    bw_after = bandwidth.measure_bandwidth_gbs()
    print(f"bandwidth: before {bw_before['read']:.1f} GB/s read, after {bw_after['read']:.1f} GB/s read")

    medians = {side: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for side, rs in rounds.items()}
    labels = {
        "step_ms": "decoding step, one conversation (ms, at 300-360 positions)",
        "prefill_s": f"prefill, {PROMPT} tokens (s)",
        "reply_s": f"one reply ({PROMPT} in, {REPLY} out; s)",
        "many_s": f"{MANY} conversations at once (s)",
    }
    print(f"| measure (median of {args.rounds}) | engine | llama.cpp | llama.cpp / engine |")
    print("|---|---|---|---|")
    for key, label in labels.items():
        ours, theirs = medians["engine"][key], medians["llama.cpp"][key]
        print(f"| {label} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": [bw_before, bw_after], "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
