"""`python -m bench.step`: the decoding step of a chat model alone, Qwen2.5-0.5B shape, int8.

Times `CausalRunner.step` directly (no scheduler, no tokenizer): one conversation at ~360 positions
(a 300-token prompt and 60 reply tokens), and 16 conversations at once (prompts of 250-400 tokens),
in several variants measured in turns in this one process, so their ratios are comparable on a
shared machine: PyTorch's step with fbgemm's int8 Linears (fused q/k/v and gate/up, attention over
each row's used length), the same step with the AVX2 int8 kernel (`bot/engine/kernel.py`), and
every layer in one C call (`bot/engine/native.py`, the default). The memory bandwidth is measured
before and after; the floor is the int8 weight bytes one step reads over that bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench import bandwidth
from bench.build import build_chat_model

VARIANTS = {  # name: (int8 Linears by the AVX2 kernel, every layer in one C call)
    "PyTorch step, fbgemm": (False, False),
    "PyTorch step, kernel": (True, False),
    "C layers (default)": (True, True),
}
BASE = "PyTorch step, fbgemm"


def load_int8(model_dir: Path, *, use_kernel: bool) -> Any:
    import contextlib

    from bot.engine import kernel
    from bot.engine.device import prepare_model
    from bot.engine.loading import load_tokenizer_and_model

    _, model = load_tokenizer_and_model(str(model_dir))
    with contextlib.nullcontext() if use_kernel else kernel.fbgemm_only():
        model, precision = prepare_model(model, "cpu", "int8")
    assert precision == "int8"
    return model


def make_runner(model: Any, *, blocks: int, max_length: int) -> Any:
    import torch

    from bot.engine.causal import CausalRunner

    return CausalRunner(model, max_blocks=blocks, max_length=max_length, cache_dtype=torch.bfloat16)


def fill(runner: Any, lengths: list[int], vocab: int) -> list[int]:
    """Prefill one random prompt per length; returns each row's next position."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        runner.add_block(torch.randint(0, vocab, (length,), generator=generator).tolist())
    return [length - 1 for length in lengths]


def time_steps(runner: Any, rows: int, start: list[int], steps: int) -> list[float]:
    """Milliseconds of each of `steps` greedy steps over the first `rows` rows, after 3 warm-up steps."""
    import torch

    saved = runner.blocks
    runner.blocks = rows
    try:
        positions = torch.tensor(start[:rows])
        tokens = torch.zeros(rows, dtype=torch.long)
        times = []
        for i in range(steps + 3):
            began = time.perf_counter()
            logits = runner.step(tokens, positions)
            tokens = logits.argmax(-1)
            if i >= 3:
                times.append((time.perf_counter() - began) * 1000)
            positions = positions + 1
    finally:
        runner.blocks = saved
    return times


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every variant")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    model_dir = build_chat_model()
    config = json.loads((model_dir / "config.json").read_text())
    started = time.perf_counter()
    from bot.engine import kernel

    lengths = [300] + [250 + 10 * i for i in range(15)]
    runners = {
        use_kernel: make_runner(load_int8(model_dir, use_kernel=use_kernel), blocks=16, max_length=2048)
        for use_kernel in (False, True)
    }
    native = runners[True].native
    assert native is not None, "the C decoder layers are not available here"
    start = {kind: fill(runners[kind], lengths, config["vocab_size"]) for kind in runners}
    print(f"loaded {len(runners)} int8 models and prefilled 16 rows each in {time.perf_counter() - started:.0f}s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel: {kernel.status()}", flush=True)

    bw_before = bandwidth.measure_bandwidth_gbs()
    one: dict[str, list[float]] = {name: [] for name in VARIANTS}
    best: dict[str, float] = {name: float("inf") for name in VARIANTS}  # the quietest round's median
    sixteen: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (use_kernel, in_c) in VARIANTS.items():
            runner = runners[use_kernel]
            runner.native = native if in_c else None
            times = time_steps(runner, 1, start[use_kernel], args.steps)
            one[name] += times
            best[name] = min(best[name], statistics.median(times))
            steps16 = max(args.steps // 4, 5)
            sixteen[name].append(statistics.median(time_steps(runner, 16, start[use_kernel], steps16)))
    bw_after = bandwidth.measure_bandwidth_gbs()

    bw = max(bw_before["best"], bw_after["best"])
    weight_bytes = bandwidth.causal_bytes_per_token(config, 1)
    floor_ms = weight_bytes / (bw * 1e9) * 1000
    print(
        f"bandwidth: before {bw_before['read']:.1f} GB/s read, {bw_before['copy']:.1f} copy; "
        f"after {bw_after['read']:.1f} read, {bw_after['copy']:.1f} copy"
    )
    print(f"floor: {weight_bytes / 1e6:.0f} MB of int8 weights per step / {bw:.1f} GB/s = {floor_ms:.1f} ms")
    base1 = statistics.median(one[BASE])
    base16 = statistics.median(sixteen[BASE])
    out: dict[str, Any] = {"bandwidth": [bw_before, bw_after], "floor_ms": floor_ms, "variants": {}}
    for name in VARIANTS:
        m1, m16 = statistics.median(one[name]), statistics.median(sixteen[name])
        q1 = statistics.quantiles(one[name], n=4)
        print(
            f"{name:20s} one conversation {m1:6.1f} ms (quartiles {q1[0]:.1f}-{q1[2]:.1f}; "
            f"{m1 / floor_ms:.2f}x floor; {m1 / base1:.2f}x before; quietest round {best[name]:.1f} ms, "
            f"{best[name] / floor_ms:.2f}x floor)   "
            f"16 at once {m16:6.1f} ms per step ({m16 / base16:.2f}x before)",
            flush=True,
        )
        out["variants"][name] = {
            "one_ms": m1,
            "one_over_floor": m1 / floor_ms,
            "one_best_ms": best[name],
            "sixteen_ms": m16,
        }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
