"""`python -m bot.serve`: Ray on this machine (no dashboard), the app on SERVE_HOST:SERVE_PORT, until stopped."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

from ray import serve

from bot.launch import load_checked_settings
from bot.metrics import MetricsPortError, serve_metrics_in_thread
from bot.serve.app import APP_NAME, build_app
from bot.serve.metrics import BOARD_NAME, BOARD_NAMESPACE, BoardMetrics, MetricsBoard
from config.settings import SettingsError


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def port_problem(host: str, port: int) -> str | None:
    """Why the HTTP proxy could not listen there (checked before Ray starts, which would only retry), or None."""
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def main(argv: list[str] | None = None, *, until: Callable[[], None] = wait_for_stop) -> int:
    """Start Ray on this machine (no dashboard), run the app on SERVE_HOST:SERVE_PORT until stopped."""
    argparse.ArgumentParser(
        prog="python -m bot.serve",
        description="Serve the model over the OpenAI chat completions API (Ray Serve), configured by the bot's "
        "settings (.env, the environment) and SERVE_HOST, SERVE_PORT, SERVE_REPLICAS.",
    ).parse_args(argv)
    try:
        settings = load_checked_settings(local_model=True)
    except SettingsError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    problem = port_problem(settings.serve_host, settings.serve_port)
    if problem:
        print(
            f"Cannot serve on SERVE_HOST {settings.serve_host}, SERVE_PORT {settings.serve_port}: {problem}",
            file=sys.stderr,
        )
        return 1
    if settings.metrics_port is not None:
        problem = port_problem(settings.metrics_host, settings.metrics_port)
        if problem:
            print(
                f"Configuration error: METRICS_PORT {settings.metrics_port} on {settings.metrics_host}: {problem}",
                file=sys.stderr,
            )
            return 2
    logging.basicConfig(level=settings.log_level, format="[%(asctime)s] [%(levelname)-8s] %(name)s: %(message)s")
    import ray

    cpus = os.cpu_count() or 1
    ray.init(include_dashboard=False, num_cpus=cpus, logging_level=logging.WARNING, log_to_driver=True)
    stop_metrics: Callable[[], None] | None = None
    try:
        if settings.metrics_port is not None:  # replicas find the board by name when they start
            board = MetricsBoard.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE).remote()  # type: ignore[attr-defined]
            try:
                stop_metrics = serve_metrics_in_thread(
                    BoardMetrics(board), settings.metrics_host, settings.metrics_port
                )
            except MetricsPortError as exc:  # taken since the check above
                print(f"Configuration error: {exc}", file=sys.stderr)
                return 2
            print(
                f"Metrics at http://{settings.metrics_host}:{settings.metrics_port}/metrics (readiness: /ready)",
                flush=True,
            )
        serve.start(http_options={"host": settings.serve_host, "port": settings.serve_port})
        replicas = settings.serve_replicas
        try:
            serve.run(
                build_app(settings, replicas=replicas, num_cpus=cpus / replicas),  # a share: never unschedulable
                name=APP_NAME,
                route_prefix="/",
            )
        except RuntimeError as exc:
            print(f"Could not start the model server: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
        url = f"http://{settings.serve_host}:{settings.serve_port}"
        print(f"Serving {settings.model_name} at {url}/v1 (point the bot at it with ENGINE_URL={url})", flush=True)
        until()
        print("Stopping the model server.", flush=True)
    finally:
        if stop_metrics is not None:
            stop_metrics()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
