"""The bench's own torch work (baselines, building models, the bandwidth probe) in threads that end with it.

The engine runs its model on a thread of its own, and torch's OpenMP (libgomp) lets the threads of
a team spin between parallel regions only while the process holds no more OpenMP threads than CPUs.
Any other thread that has run a parallel torch op keeps its own team until that thread ends, and
from then on every team sleeps between regions and is woken for each. On a 2-core VM that made
the engine 2.1x slower: one BlenderBot reply (10 beams, 20 tokens) took 0.63 s, and 1.35 s after a
single `torch.ones(2**20)` on the main thread; run in a thread that had ended, the same call left it
at 0.65 s. The bot runs torch on the engine's thread alone, so the bench keeps every other torch call
off the threads that outlive it, or it would measure an engine slower than the one people run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on a new thread, waited for; its OpenMP team ends with that thread."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            error.append(exc)

    thread = threading.Thread(target=run, name="bench-torch")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
