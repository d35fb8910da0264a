"""Memory measurements: /proc readings and load+prepare peak RSS in a fresh subprocess."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path


def proc_status_mb() -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of this process in MB (Linux)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so later peaks measure one phase."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _child(model_dir: str, mode: str) -> None:
    """Runs in the fresh subprocess: load + prepare, print the memory readings as JSON."""
    import asyncio
    import logging
    import time
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    before = proc_status_mb()
    started = time.monotonic()
    result: dict[str, object] = {"mode": mode, "rss_before_load_mb": before.get("VmRSS")}
    if mode == "naive_quantize_dynamic":
        import torch
        from torch.ao.quantization import quantize_dynamic
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        result["load_prepare_s"] = time.monotonic() - started
        result["peak_rss_load_prepare_mb"] = proc_status_mb().get("VmHWM")
        result["steady_rss_mb"] = proc_status_mb().get("VmRSS")
    else:
        from bench.workload import conversations
        from bot.core.types import Turn
        from bot.engine import Engine, EngineConfig

        # serve_16x10x60: BlenderBot answers 16 conversations at once, 10 beams, 60 tokens;
        # chat_serve_16 (a chat model) and greedy_serve_16 (either family): 16 at once, greedy, 60 tokens.
        serving = mode in ("serve_16x10x60", "chat_serve_16", "greedy_serve_16")
        beams, tokens = (10 if mode == "serve_16x10x60" else 1, 60) if serving else (1, 5)

        async def run() -> None:
            engine = Engine(
                EngineConfig(
                    model_name=model_dir,
                    device="cpu",
                    precision="int8" if serving else mode,
                    num_beams=beams,
                    min_new_tokens=tokens,
                    max_new_tokens=tokens,
                    sampling=False,
                    generation_timeout_seconds=600,  # a slow or busy machine measures, rather than times out
                )
            )
            await engine.start()
            result["load_prepare_s"] = time.monotonic() - started
            result["peak_rss_load_prepare_mb"] = proc_status_mb().get("VmHWM")
            result["rss_after_load_mb"] = proc_status_mb().get("VmRSS")
            reset_peak()  # the peak while answering one conversation alone, after the load's own peak
            await engine.reply([Turn("user", "hello there, how are you today?")])
            result["peak_rss_one_reply_mb"] = proc_status_mb().get("VmHWM")
            status = proc_status_mb()
            result["steady_rss_mb"] = status.get("VmRSS")
            result["rss_anon_mb"] = status.get("RssAnon")
            result["rss_file_mb"] = status.get("RssFile")
            result["precision_used"] = engine.precision
            if serving:  # the peak while serving, after the load's own peak (reported above)
                reset_peak()
                await asyncio.gather(*(engine.reply(h) for h in conversations(16, seed=16)))
                result["peak_rss_serving_mb"] = proc_status_mb().get("VmHWM")
            await engine.close()

        asyncio.run(run())
    print("RESULT " + json.dumps(result), flush=True)


def measure_load(model_dir: Path, mode: str, timeout: float = 240) -> dict[str, object]:
    """Load (and prepare) the model in a fresh interpreter; returns its memory readings."""
    cmd = [sys.executable, "-m", "bench.memory", str(model_dir), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"mode": mode, "error": (proc.stderr or proc.stdout)[-800:]}


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
