"""transformers' continuous batching (`ContinuousBatchingManager`, behind `generate_batch`) vs the engine.

The same 16 conversations of the chat bench, rendered by the engine into the same prompt tokens,
answered all at once, greedy, exactly `tokens` new tokens each (no end-of-sequence token, so both
do the same work). transformers runs the model as loaded (fp32 here); the engine is timed in fp32,
like for like, and int8, as the bot runs it. Each side is warmed up first; the time is from handing
over the 16 requests until the last reply is complete.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

from bench import workload
from bench.threads import in_own_thread

CONVERSATIONS = 16
PAGE = 64  # tokens per cache page of transformers' paged cache


async def engine_side(model_dir: Path, precision: str, tokens: int, system_prompt: str) -> dict[str, Any]:
    """The engine with room for all 16 at once; returns the time and the 16 prompts it built."""
    from bot.engine import Engine, EngineConfig

    config = EngineConfig(
        model_name=str(model_dir),
        device="cpu",
        precision=precision,
        min_new_tokens=tokens,
        max_new_tokens=tokens,
        sampling=False,
        system_prompt=system_prompt,
        max_batch=CONVERSATIONS,
        max_queue=256,
        generation_timeout_seconds=600,  # fp32 on a busy machine may take longer than the bot's 60 s
    )
    histories = workload.conversations(CONVERSATIONS, seed=CONVERSATIONS)
    async with Engine(config) as engine:
        await engine.reply(workload.conversations(1, seed=99)[0])  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(engine.reply(h) for h in histories))
        seconds = time.perf_counter() - started
        prompts = [list(engine.encode_prompt(h)) for h in histories]
        return {"precision": engine.precision, "all_answered_s": seconds, "prompts": prompts}


def transformers_side(model_dir: Path, prompts: list[list[int]], tokens: int, precision: str) -> dict[str, Any]:
    """`ContinuousBatchingManager` on the CPU, its paged cache sized for these requests.

    fp32 is the model as loaded; int8 is the model with the engine's own int8 Linears swapped in
    (`prepare_model`), so transformers' scheduling and paged attention run the engine's kernels.

    Left to size its cache itself, it takes a share of the machine's free memory (13.9 GB of RSS on
    a 23 GB VM for a tiny model), so the bench gives it the pages the 16 requests need.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from bot.engine.device import prepare_model

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model, _ = prepare_model(model, "cpu", precision)
    generation = GenerationConfig(do_sample=False, max_new_tokens=tokens, pad_token_id=model.config.bos_token_id)
    generation.eos_token_id = -1  # no end of sequence: every reply is exactly `tokens` long, as on the engine
    pages = sum(math.ceil((len(p) + tokens) / PAGE) for p in prompts) + CONVERSATIONS
    batching = ContinuousBatchingConfig(
        page_size=PAGE,
        num_blocks=pages,
        max_batch_tokens=max(1024, max(len(p) for p in prompts) + CONVERSATIONS),
        max_requests_per_batch=CONVERSATIONS,
    )
    started = time.perf_counter()
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=batching)
    manager.start()
    try:
        _collect(manager, manager.add_requests(inputs=[prompts[0][:8]], max_new_tokens=4))  # warm-up
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        results = _collect(manager, manager.add_requests(inputs=prompts, max_new_tokens=tokens))
        seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    lengths = sorted({len(r.generated_tokens) for r in results})
    errors = [r.error for r in results if r.error is not None]
    return {"all_answered_s": seconds, "setup_s": setup_s, "reply_lengths": lengths, "errors": errors[:3]}


def _collect(manager: Any, request_ids: list[str], timeout_s: float = 600) -> list[Any]:
    """Wait until every request is finished; raise if the manager stops or it takes too long."""
    done: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(request_ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(done)} of {len(request_ids)} requests finished in {timeout_s:.0f}s")
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            done[result.request_id] = result
        elif result is None and not manager.is_running():
            raise RuntimeError(f"the continuous batching thread stopped after {len(done)} replies")
    return [done[i] for i in request_ids]


def compare(model_dir: Path, tokens: int, system_prompt: str) -> dict[str, Any]:
    """Both sides on the same 16 prompts; a failure of transformers' side is recorded, not raised."""
    out: dict[str, Any] = {"conversations": CONVERSATIONS, "tokens": tokens}
    fp32 = asyncio.run(engine_side(model_dir, "fp32", tokens, system_prompt))
    int8 = asyncio.run(engine_side(model_dir, "int8", tokens, system_prompt))
    prompts = fp32.pop("prompts")
    int8.pop("prompts")
    out["engine_fp32"], out["engine_int8"] = fp32, int8
    out["prompt_tokens"] = [min(len(p) for p in prompts), max(len(p) for p in prompts)]
    for precision in ("fp32", "int8"):
        try:
            out[f"transformers_{precision}"] = in_own_thread(transformers_side, model_dir, prompts, tokens, precision)
        except Exception as error:  # noqa: BLE001 - whatever it raises on the CPU is the finding
            out[f"transformers_{precision}"] = {"error": f"{type(error).__name__}: {error}"}
    return out


def summary(out: dict[str, Any]) -> list[str]:
    n, tokens = out["conversations"], out["tokens"]
    lines = [f"  {n} conversations at once, {tokens} tokens, greedy: transformers' continuous batching vs the engine"]
    for precision in ("fp32", "int8"):
        engine_s, cb = out[f"engine_{precision}"]["all_answered_s"], out[f"transformers_{precision}"]
        if "error" in cb:
            lines.append(f"    {precision}: engine {engine_s:.2f}s; continuous batching failed: {cb['error']}")
            continue
        if cb["errors"] or cb["reply_lengths"] != [tokens]:
            lines.append(
                f"    {precision} continuous batching replies: lengths {cb['reply_lengths']}, errors {cb['errors']}"
            )
        lines.append(
            f"    {precision}: continuous batching {cb['all_answered_s']:.2f}s, engine {engine_s:.2f}s "
            f"(continuous batching takes {cb['all_answered_s'] / engine_s:.2f}x as long)"
        )
    return lines


def main() -> int:
    """`python -m bench.continuous`: this comparison alone, on the chat bench's model."""
    import json
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from bench.build import build_chat_model
    from bench.chat_bench import REPLY, SYSTEM_PROMPT

    out = compare(build_chat_model(), REPLY, SYSTEM_PROMPT)
    print(json.dumps(out, indent=2))
    print("\n".join(summary(out)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
