"""The Ray Serve app (`python -m bot.serve`) on the tiny chat model: a start/stop helper, and one app per session.

A pytest plugin (see `pytest_plugins` in tests/conftest.py). Ray takes seconds to start, so every
test that needs the server shares one: the `serve_app` fixture starts it on first use and stops it
(SIGTERM, then SIGKILL if it lingers) at the end of the session, also when tests fail.

The server runs greedy (SAMPLING off) in fp32 on the CPU, so its replies can be compared with an
in-process engine's on the same model. MAX_BATCH=1 and MAX_QUEUE=1 let a test fill its queue.

`ServeProcess` is the helper behind it, for tests that need their own app (more replicas, or one to
stop and start again on the same port while bots use it).
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

import psutil
import pytest

from tests.fake_openai import free_port

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
# How long Ray's own processes (GCS, raylet, workers, replicas) may outlive the stopped app.
LEFTOVER_TIMEOUT_S = 15.0
READY_LINE = "Serving "  # printed once the app runs, just before it waits for a signal
STOPPED_LINE = "Stopping the model server."


@dataclass(frozen=True)
class ServeApp:
    url: str  # ENGINE_URL for the bot: no /v1
    model: str  # the id it serves: MODEL_NAME
    log: Path
    metrics_url: str  # its METRICS_PORT: /metrics, /ready, /health
    pid: int  # the `python -m bot.serve` process: its replicas run under it


class ServeProcess:
    """`python -m bot.serve` on `model_dir`, run in `workdir` (no .env of the developer's is read there).

    The port is chosen once, so `start()` after `stop()` brings the app back at the same URL. Its
    output (both runs) goes to `workdir/serve.log`. `env` overrides its settings (SERVE_REPLICAS...).
    """

    def __init__(self, model_dir: Path, workdir: Path, **env: str) -> None:
        self.model = str(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "serve.log"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MODEL_NAME": self.model,
            "DEVICE": "cpu",
            "PRECISION": "fp32",
            "SAMPLING": "false",
            "SERVE_HOST": "127.0.0.1",
            "SERVE_PORT": str(self.port),
            "LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> None:
        """Start the app and wait until it answers /health and says it is serving (raises if it does not)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        skip = len(self.output)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bot.serve"],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(skip)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT_S); then every process it started must be gone. Its exit code."""
        process = self.process
        if process is None:
            return None
        try:
            leftovers = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
        except psutil.NoSuchProcess:
            leftovers = []
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _, alive = psutil.wait_procs(leftovers, timeout=LEFTOVER_TIMEOUT_S)
        if alive:
            for straggler in alive:
                straggler.kill()
            names = ", ".join(f"{p.pid}" for p in alive)
            raise AssertionError(f"python -m bot.serve left processes running (killed now): {names}")
        return process.returncode

    def _wait_ready(self, skip: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"python -m bot.serve exited with {self.process.returncode}:\n{self.output[skip:][-3000:]}"
                )
            if READY_LINE in self.output[skip:] and _healthy(self.url):
                return
            time.sleep(0.3)
        tail = self.output[skip:][-3000:]
        raise AssertionError(f"python -m bot.serve was not serving within {START_TIMEOUT_S:.0f}s:\n{tail}")


def replica_processes(server_pid: int) -> list[psutil.Process]:
    """The engine replicas' processes under a `python -m bot.serve` (Ray titles them `ray::ServeReplica:...`)."""
    found = []
    for process in psutil.Process(server_pid).children(recursive=True):
        try:
            if "ServeReplica:" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:  # not listening yet, or 503 while the replica starts
        return False


@pytest.fixture(scope="session")
def serve_app(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    metrics_port = free_port()
    server = ServeProcess(
        tiny_chat_model_dir,
        tmp_path_factory.mktemp("serve"),
        MAX_BATCH="1",
        MAX_QUEUE="1",
        METRICS_PORT=str(metrics_port),
    )
    server.start()
    try:
        assert server.process is not None
        yield ServeApp(server.url, server.model, server.log, f"http://127.0.0.1:{metrics_port}", server.process.pid)
    finally:
        code = server.stop()
    output = server.output
    assert code == 0 and STOPPED_LINE in output, output[-3000:]
