"""The Ray Serve app (`python -m bot.serve`) on the tiny chat model, started once per test session.

A pytest plugin (see `pytest_plugins` in tests/conftest.py). Ray takes seconds to start, so every
test that needs the server shares one: the `serve_app` fixture starts it on first use and stops it
(SIGTERM, then SIGKILL if it lingers) at the end of the session, also when tests fail.

The server runs greedy (SAMPLING off) in fp32 on the CPU, so its replies can be compared with an
in-process engine's on the same model. MAX_BATCH=1 and MAX_QUEUE=1 let a test fill its queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fake_openai import free_port

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ServeApp:
    url: str  # ENGINE_URL for the bot: no /v1
    model: str  # the id it serves: MODEL_NAME
    log: Path
    metrics_url: str  # its METRICS_PORT: /metrics, /ready, /health


@pytest.fixture(scope="session")
def serve_app(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    workdir = tmp_path_factory.mktemp("serve")  # its working folder: no .env of the developer's is read
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MODEL_NAME": str(tiny_chat_model_dir),
        "DEVICE": "cpu",
        "PRECISION": "fp32",
        "SAMPLING": "false",
        "MAX_BATCH": "1",
        "MAX_QUEUE": "1",
        "SERVE_HOST": "127.0.0.1",
        "SERVE_PORT": str(port),
        "METRICS_PORT": str(metrics_port),
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = workdir / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bot.serve"], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log)
        yield ServeApp(url, str(tiny_chat_model_dir), log, f"http://127.0.0.1:{metrics_port}")
    finally:
        _stop(process)
    output = log.read_text(errors="replace")
    assert process.returncode == 0 and "Stopping the model server." in output, output[-3000:]


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"python -m bot.serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while the replica starts
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:]
    raise AssertionError(f"python -m bot.serve was not healthy within {START_TIMEOUT_S:.0f}s:\n{tail}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
