"""Does a second engine replica answer a crowd sooner? `python -m bot.serve` with 1, then 2 replicas.

    .venv/bin/python -m bench.replicas                       # the full-size random Qwen2.5-0.5B (bench/.cache)
    .venv/bin/python -m bench.replicas --model PATH --conversations 16 --tokens 32

For each replica count the server is started on a free port with SERVE_REPLICAS set and everything
else equal (the same model, PRECISION, MAX_BATCH large enough for every conversation at once,
greedy, every reply exactly `--tokens` tokens long, so each run does the same work). After a warm-up
(twice as many requests as replicas, at once), `--conversations` different conversations are sent at once through
`bot.remote.RemoteEngine` (what a bot with ENGINE_URL uses) and the time until the last one is
answered is taken. The servers are started in the order `--sequence` gives (1,2,2,1 by default,
so that a machine whose other load changes during the run weighs on both counts alike); the best
time of each count counts. Prints both times, their ratio, the machine's cores and the torch
threads each replica computes with (its /health says).

By default the replicas share the machine as `bot.serve` shares it: one replica gets every core,
two get half each, so the second replica brings no compute of its own. `--threads N` gives every
replica N threads instead: on a machine with at least twice N cores that is the comparison the
target is about, one replica against two that each have as much as the one had.

The target (issue 10) is a ratio of at least 1.6. A second replica adds compute only when there
are cores (or machines) for it; sharing the cores one replica had, two replicas gain only what the
one left idle. docs/deployment.md has the numbers measured. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.serve_overhead import free_port
from bot.core.types import Turn

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 900.0  # two replicas load (and quantize) the model at once on a small machine
TOPICS = (
    "music", "the sea", "old trains", "gardening", "chess", "rainy days", "bread", "the moon",
    "bicycles", "maps", "winter", "cats", "libraries", "bridges", "tea", "mountains",
)  # fmt: skip


def conversation(index: int) -> list[Turn]:
    topic = TOPICS[index % len(TOPICS)]
    return [
        Turn("user", f"hello, I am person {index}", f"User{index}"),
        Turn("bot", "Hello! Nice to meet you. What shall we talk about?"),
        Turn("user", f"tell me something about {topic}", f"User{index}"),
    ]


def start_server(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    import urllib.request

    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "bot.serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"http://127.0.0.1:{env['SERVE_PORT']}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"python -m bot.serve exited:\n{log.read_text()[-2000:]}")
        if "Serving " in log.read_text(errors="replace"):  # printed once every replica is up
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    return process
            except OSError:
                pass
        time.sleep(1)
    stop_server(process)
    raise SystemExit(f"python -m bot.serve did not start within {START_TIMEOUT_S:.0f}s:\n{log.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def replica_threads(url: str, replicas: int) -> dict[int, int]:
    """Replica process id -> its torch threads, from /health (asked until every replica has answered)."""
    import json
    import urllib.request

    seen: dict[int, int] = {}
    for _ in range(50 * replicas):
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            health = json.load(response)
        seen[health["pid"]] = health["torch_threads"]
        if len(seen) == replicas:
            break
    return seen


async def crowd(url: str, conversations: int, rounds: int, warmups: int) -> list[float]:
    from bot.remote import RemoteConfig, RemoteEngine

    config = RemoteConfig(url=url, sampling=False, stream=False, timeout_seconds=START_TIMEOUT_S)
    async with RemoteEngine(config) as engine:
        await asyncio.gather(*(engine.reply(conversation(i)) for i in range(warmups)))
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            # The random model's words may decode to nothing; the work (`--tokens` tokens each) is the same.
            await asyncio.gather(*(engine.reply(conversation(i)) for i in range(conversations)))
            times.append(time.perf_counter() - started)
    return times


def run(model: str, replicas: int, args: argparse.Namespace, workdir: Path) -> tuple[float, list[int]]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_NAME": model,
        "DEVICE": "cpu",
        "PRECISION": args.precision,
        "SAMPLING": "false",
        "MIN_NEW_TOKENS": str(args.tokens),
        "MAX_NEW_TOKENS": str(args.tokens),
        "MAX_BATCH": str(args.conversations),
        "MAX_QUEUE": str(4 * args.conversations),
        "GENERATION_TIMEOUT_SECONDS": str(START_TIMEOUT_S),
        "SERVE_HOST": "127.0.0.1",
        "SERVE_PORT": str(port),
        "SERVE_REPLICAS": str(replicas),
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("OMP_NUM_THREADS", None)  # by default bot.serve's share of the cores decides
    if args.threads is not None:  # Ray leaves a set OMP_NUM_THREADS alone: every replica gets as many
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"starting python -m bot.serve with SERVE_REPLICAS={replicas} ...", flush=True)
    server = start_server(env, workdir / f"serve-{replicas}-{time.monotonic():.0f}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        threads = replica_threads(url, replicas)
        times = asyncio.run(crowd(url, args.conversations, args.rounds, 2 * replicas))
    finally:
        stop_server(server)
    print(f"  {replicas} replica(s): {', '.join(f'{t:.1f}s' for t in times)}", flush=True)
    return min(times), sorted(threads.values())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="a model folder (default: the random Qwen2.5-0.5B, built once into bench/.cache)"
    )
    parser.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="tokens in every reply (default 32)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per server start (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of every replica, whatever the count (default: bot.serve's equal share of the cores); "
        "with 2 replicas x N threads on at least 2N cores this shows what a replica with cores of its own adds",
    )
    parser.add_argument(
        "--sequence",
        default="1,2,2,1",
        help="replica counts to start, in order (default 1,2,2,1: a machine whose load changes over the run "
        "weighs on both); the best time of each count counts",
    )
    args = parser.parse_args()
    sequence = [int(n) for n in args.sequence.split(",")]
    if sorted(set(sequence)) != [1, 2]:
        parser.error("--sequence must name 1 and 2 replicas (e.g. 1,2)")
    if args.model is None:
        from bench.build import build_chat_model

        args.model = str(build_chat_model())
    best: dict[int, float] = {}
    threads: dict[int, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        for replicas in sequence:
            seconds, threads[replicas] = run(args.model, replicas, args, Path(tmp))
            best[replicas] = min(seconds, best.get(replicas, seconds))
    one, two = best[1], best[2]
    print()
    print(
        f"model {args.model} ({args.precision}), {args.conversations} conversations at once, {args.tokens} tokens each"
    )
    print(f"  os.cpu_count()            {os.cpu_count()}")
    for replicas in (1, 2):
        per = ", ".join(str(n) for n in threads[replicas])
        print(
            f"  {replicas} replica(s): all answered in {best[replicas]:6.1f} s (best; torch threads per replica: {per})"
        )
    print(f"  speed-up with 2 replicas: {one / two:.2f}x (target: at least 1.6x)")


if __name__ == "__main__":
    main()
