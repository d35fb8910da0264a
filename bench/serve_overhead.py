"""What serving the model through `python -m bot.serve` costs per reply, against the engine in-process.

    .venv/bin/python -m bench.serve_overhead                      # the tiny test chat model, built here
    .venv/bin/python -m bench.serve_overhead --model PATH --precision int8 --replies 10

Both paths run the same model with the same settings, greedy, one reply at a time to the same
conversation: `bot.engine.Engine` in this process, and `python -m bot.serve` on a free port asked
through `bot.remote.RemoteEngine` (what a bot with ENGINE_URL does). Replies alternate between the
two, so a machine busy with other work slows both alike. Prints the median time per reply of each
and the ratio. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bot.core.types import Turn

REPO = Path(__file__).resolve().parents[1]
HISTORY = [
    Turn("user", "hello there, how are you today?", "Alice"),
    Turn("bot", "I'm fine, thanks. What would you like to talk about?"),
    Turn("user", "tell me about your favourite music", "Alice"),
]
SYSTEM = "You are a friendly assistant."


TIMEOUT_S = 600.0


def settings_env(model: str, precision: str, max_new_tokens: int | None) -> dict[str, str]:
    env = {"MODEL_NAME": model, "DEVICE": "cpu", "PRECISION": precision, "SAMPLING": "false", "SYSTEM_PROMPT": SYSTEM}
    env["GENERATION_TIMEOUT_SECONDS"] = str(TIMEOUT_S)
    if max_new_tokens is not None:
        env["MAX_NEW_TOKENS"] = str(max_new_tokens)
    return env


async def alternate(
    model: str, precision: str, url: str, replies: int, threads: int, max_new_tokens: int | None
) -> tuple[list[float], list[float], bool]:
    """Time each path `replies` times, one reply each in turn, so a busy machine slows both alike."""
    import torch

    from bot.engine import Engine, EngineConfig
    from bot.remote import RemoteConfig, RemoteEngine

    torch.set_num_threads(threads)
    local_config = EngineConfig(
        model_name=model,
        device="cpu",
        precision=precision,
        sampling=False,
        system_prompt=SYSTEM,
        max_new_tokens=max_new_tokens,
        generation_timeout_seconds=TIMEOUT_S,
    )
    remote_config = RemoteConfig(url=url, system_prompt=SYSTEM, sampling=False, stream=False, timeout_seconds=TIMEOUT_S)
    local_times: list[float] = []
    served_times: list[float] = []
    async with Engine(local_config) as local, RemoteEngine(remote_config) as served:
        same = await local.reply(HISTORY) == await served.reply(HISTORY)  # warm up both
        for _ in range(replies):
            for engine, times in ((local, local_times), (served, served_times)):
                started = time.perf_counter()
                await engine.reply(HISTORY)
                times.append(time.perf_counter() - started)
    return local_times, served_times, same


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    model: str, precision: str, max_new_tokens: int | None, port: int, threads: int, log: Path
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env(model, precision, max_new_tokens), "SERVE_PORT": str(port)}
    env["LOG_LEVEL"] = "WARNING"
    env["OMP_NUM_THREADS"] = str(threads)  # Ray keeps it for the replica; the engine's torch then uses as many
    env["PYTHONPATH"] = str(REPO)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "bot.serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"python -m bot.serve exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    raise SystemExit("python -m bot.serve did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder or hub id (default: the tiny test chat model, built here)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--replies", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, help="longest reply (default: the model's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both paths (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            tiny = importlib.import_module("tests.tiny_causal_model")
            model = str(tiny.build_tiny_causal_model(Path(tmp) / "tiny-chat"))
        port = free_port()
        server = start_server(model, args.precision, args.max_new_tokens, port, args.threads, Path(tmp) / "serve.log")
        try:
            local, served, same = asyncio.run(
                alternate(
                    model, args.precision, f"http://127.0.0.1:{port}", args.replies, args.threads, args.max_new_tokens
                )
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    a, b = statistics.median(local), statistics.median(served)
    print(f"model {model} ({args.precision}, {args.threads} torch threads), {args.replies} replies each, median:")
    print(f"  in-process engine:        {a * 1000:8.1f} ms")
    print(f"  through bot.serve (HTTP): {b * 1000:8.1f} ms")
    print(f"  ratio: {b / a:.3f} ({(b - a) * 1000:+.1f} ms per reply)")
    if not same:
        print("  note: the two paths wrote different replies (thread counts can change float rounding)")


if __name__ == "__main__":
    main()
