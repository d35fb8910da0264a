"""The engine as it was before step scheduling, kept as a baseline: whole batches through `generate()`.

One thread collects the requests that wait within a short window (up to `max_batch`), pads every
prompt to the model's 128 positions and runs one `generate()` for the batch; a request that arrives
meanwhile waits for the whole batch to end. Same int8 model, same prompts as the product's engine.
Beam search shares each request's cross-attention keys and values across its beams, as it did.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import torch
from torch import nn

from bot.core.types import Turn
from bot.engine.device import prepare_model
from bot.engine.loading import load_tokenizer_and_model
from bot.engine.prompt import build_input_ids


class _BeamShared(nn.Module):
    """A cross-attention key/value projection run once per request, then repeated for its beams."""

    def __init__(self, inner: nn.Module, group: int) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g > 1 and states.shape[0] % g == 0:
            return self.inner(states[::g]).repeat_interleave(g, dim=0)
        return self.inner(states)


def _reorder_self_attention_only(cache: Any, beam_idx: Any) -> Any:
    cache.self_attention_cache.reorder_cache(beam_idx)
    return cache


class StaticBatchEngine:
    """`await reply(history)` like the product's Engine; `batches` records (time, size) of every batch."""

    def __init__(self, model_dir: str, *, beams: int, new_tokens: int, max_batch: int = 8, window_ms: int = 20) -> None:
        self.tokenizer, model = load_tokenizer_and_model(model_dir)
        self.model, self.precision = prepare_model(model, "cpu", "int8")
        gen = self.model.generation_config
        gen.num_beams, gen.min_new_tokens, gen.max_new_tokens = beams, new_tokens, new_tokens
        gen.min_length = gen.max_length = None
        if beams == 1:
            gen.length_penalty, gen.early_stopping = 1.0, False
        self.model._reorder_cache = _reorder_self_attention_only
        for name, module in list(self.model.named_modules()):
            if name.endswith("encoder_attn"):
                module.k_proj = _BeamShared(module.k_proj, beams)
                module.v_proj = _BeamShared(module.v_proj, beams)
        self.width = int(self.model.config.max_position_embeddings)
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.batches: list[tuple[float, int]] = []
        self.running = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    async def reply(self, history: list[Turn]) -> str:
        tok = self.tokenizer
        ids = build_input_ids(history, lambda t: tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id, 128)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._queue.put((ids, loop, future))
        return await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            ends = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, ends - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self.batches.append((time.monotonic(), len(batch)))
            self.running = len(batch)
            texts = self._generate([ids for ids, _, _ in batch])
            self.running = 0
            for (_, loop, future), text in zip(batch, texts, strict=True):
                loop.call_soon_threadsafe(future.set_result, text)

    def _generate(self, prompts: list[list[int]]) -> list[str]:
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([p + [pad] * (self.width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (self.width - len(p)) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
