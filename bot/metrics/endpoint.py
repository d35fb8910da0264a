"""The metrics endpoint: `/metrics` (Prometheus text), `/ready` and `/health`, one aiohttp app for every process.

`/ready` answers 200 once every readiness check passes and 503 with the reasons otherwise; `/health`
200 while the process answers at all. A bot process serves its `Metrics` on its own event loop
(`serve_metrics`); the model server's driver, which has no event loop of its own, serves the
replicas' numbers from a thread (`serve_metrics_in_thread`).
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable
from typing import Protocol

from aiohttp import web


class MetricsSource(Protocol):
    """What the endpoint serves: `Metrics`, or the model server's board of replica reports."""

    def render(self) -> tuple[bytes, str]: ...

    def readiness(self) -> list[str]: ...


class MetricsPortError(Exception):
    """The metrics port could not be opened; the message is one line naming METRICS_PORT."""


class MetricsUnavailable(Exception):
    """The numbers cannot be read right now (the endpoint answers 503 with the message)."""


def metrics_app(metrics: MetricsSource) -> web.Application:
    """`/metrics`, `/ready` and `/health` as an aiohttp app."""

    async def scrape(request: web.Request) -> web.Response:
        try:
            body, content_type = metrics.render()
        except MetricsUnavailable as exc:
            return web.Response(status=503, text=f"{exc}\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def ready(request: web.Request) -> web.Response:
        try:
            reasons = metrics.readiness()
        except MetricsUnavailable as exc:
            reasons = [str(exc)]
        if reasons:
            return web.Response(status=503, text="not ready: " + "; ".join(reasons) + "\n")
        return web.Response(text="ready\n")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/ready", ready)
    app.router.add_get("/health", health)
    return app


async def serve_metrics(metrics: MetricsSource, host: str, port: int) -> web.AppRunner:
    """Listen on `host:port` on the running loop; the caller stops it with `await runner.cleanup()`.

    Raises `MetricsPortError` (one line) when the address cannot be used, such as a port in use.
    """
    runner = web.AppRunner(metrics_app(metrics), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is already in use (another process, or a second bot with the same METRICS_PORT)"
        else:
            reason = exc.strerror or str(exc)
        raise MetricsPortError(f"METRICS_PORT {port} on METRICS_HOST {host} cannot be opened: {reason}") from None
    return runner


def serve_metrics_in_thread(metrics: MetricsSource, host: str, port: int) -> Callable[[], None]:
    """`serve_metrics` on an event loop of its own, in a daemon thread; returns the function that stops it.

    Raises `MetricsPortError` as `serve_metrics` does, before returning.
    """
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="metrics", daemon=True).start()
    try:
        runner = asyncio.run_coroutine_threadsafe(serve_metrics(metrics, host, port), loop).result()
    except MetricsPortError:
        loop.call_soon_threadsafe(loop.stop)
        raise

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)

    return stop
