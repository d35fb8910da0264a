"""Build the full-size random BlenderBot-400M-distill (and a tokenizer) once, into bench/.cache.

The architecture and generation defaults are the real model's `config.json` and
`generation_config.json`, kept in this repository under bench/models/blenderbot-400M-distill
($BENCH_MODEL_SPEC names another directory holding the same two files). Nothing is downloaded.
Compute per token does not depend on the weight values, so random weights cost exactly what the
real ones would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.threads import in_own_thread

BENCH_DIR = Path(__file__).resolve().parent
SPEC_DIR = Path(os.environ.get("BENCH_MODEL_SPEC") or BENCH_DIR / "models" / "blenderbot-400M-distill")
CACHE_DIR = BENCH_DIR / ".cache"
MODEL_DIR = CACHE_DIR / "blenderbot-400M-random"
DONE = "BENCH_MODEL.json"

_SYLLABLES = [
    c + v
    for c in (
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "y",
        "th",
        "sh",
        "ch",
        "st",
        "tr",
    )
    for v in ("a", "e", "i", "o", "u", "ay", "ee", "ou", "er", "in", "an", "on")
]


def _corpus(n_lines: int, seed: int) -> list[str]:
    """Pseudo-English lines, varied enough for byte-level BPE to learn ~8k merges."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(words))]  # Zipf-like
    lines = []
    for _ in range(n_lines):
        picked = rng.choices(words, weights, k=rng.randint(5, 20))
        line = " ".join(picked)
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "?", "!", ","])
        lines.append(line)
    return lines


def build_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BlenderbotTokenizer

    raw = out / "_bpe"
    raw.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    # `<mask>` is added last by BlenderbotTokenizer, as in the real tokenizer: train one fewer.
    bpe.train_from_iterator(
        _corpus(40000, seed=0),
        vocab_size=vocab_size - 1,
        min_frequency=2,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        show_progress=False,
    )
    bpe.save_model(str(raw))
    tok = BlenderbotTokenizer(vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"), add_eos_token=True)
    tok.save_pretrained(str(out))
    shutil.rmtree(raw, ignore_errors=True)


def _build_once(out: Path, spec: Path, write: Callable[[Path, dict[str, Any], dict[str, Any]], int]) -> Path:
    """Build into `out` with `write(folder, config, generation_config)` unless it was built from this spec.

    The model is written to a temporary folder and renamed, so an interrupted build leaves nothing
    that looks finished. `write` returns the parameter count.
    """
    config_dict = json.loads((spec / "config.json").read_text())
    gen_dict = json.loads((spec / "generation_config.json").read_text())
    try:
        built = json.loads((out / DONE).read_text())
    except (OSError, ValueError):
        built = {}
    if built.get("config") == config_dict and built.get("generation_config") == gen_dict:
        return out
    started = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = in_own_thread(write, tmp, config_dict, gen_dict)  # its torch work ends with it: bench.threads
    done = {"spec": str(spec), "config": config_dict, "generation_config": gen_dict, "parameters": params}
    (tmp / DONE).write_text(json.dumps(done | {"seconds": time.monotonic() - started}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_model(out: Path = MODEL_DIR, spec: Path = SPEC_DIR) -> Path:
    """The random full-size BlenderBot-400M-distill, unless already built from this spec; returns `out`."""
    return _build_once(out, spec, _write_blenderbot)


def _write_blenderbot(folder: Path, config_dict: dict[str, Any], gen_dict: dict[str, Any]) -> int:
    import torch
    from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration, GenerationConfig

    build_tokenizer(folder, int(config_dict["vocab_size"]))
    torch.manual_seed(0)
    model = BlenderbotForConditionalGeneration(BlenderbotConfig(**config_dict)).eval()
    model.generation_config = GenerationConfig(**gen_dict)
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


CHAT_SPEC_DIR = BENCH_DIR / "models" / "qwen2.5-0.5b-instruct"
CHAT_MODEL_DIR = CACHE_DIR / "qwen2.5-0.5b-random"
# The real models' chat format (ChatML, which Qwen2.5, Qwen3 and SmolLM2 all use); their tokenizers
# (49,152 to 151,646 tokens) are not in the repository, so the bench trains a small one: the
# vocabulary size of the model itself, which sets the cost of the embedding and output layers, comes
# from the spec.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Per spec folder: which special token each of the real model's token ids is, so the spec's
# bos/eos/pad ids can be mapped onto the bench's own small tokenizer.
SPECIAL_IDS: dict[str, dict[int, str]] = {
    "qwen2.5-0.5b-instruct": {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
    "qwen3-0.6b": {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
    "smollm2-360m-instruct": {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"},
}


def build_chat_model(out: Path = CHAT_MODEL_DIR, spec: Path = CHAT_SPEC_DIR) -> Path:
    """A random full-size decoder-only chat model (ChatML template, 8k-token BPE), unless already built.

    By default Qwen2.5-0.5B-Instruct; `spec` names another folder of bench/models/ listed in
    `SPECIAL_IDS` (any Llama, Qwen2 or Qwen3 shape).
    """
    special = SPECIAL_IDS[spec.name]
    return _build_once(out, spec, lambda folder, config, gen: _write_chat_model(folder, config, gen, special))


def _map_token_ids(values: dict[str, Any], real_to_here: dict[int, int]) -> dict[str, Any]:
    """The `*_token_id` entries of a config, with the real model's ids replaced by the bench tokenizer's."""
    mapped: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = values.get(key)
        if isinstance(value, list):
            mapped[key] = [real_to_here[v] for v in value]
        elif value is not None:
            mapped[key] = real_to_here[value]
    return mapped


def _write_chat_model(
    folder: Path, config_dict: dict[str, Any], gen_dict: dict[str, Any], special: dict[int, str]
) -> int:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(40000, seed=0), vocab_size=8000, min_frequency=2, special_tokens=CHAT_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token=CHAT_SPECIAL[0]
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(folder))
    token_ids: list[int] = tokenizer.convert_tokens_to_ids(CHAT_SPECIAL)  # type: ignore[assignment]  # a list in, a list out
    here = dict(zip(CHAT_SPECIAL, token_ids, strict=True))
    real_to_here = {real: here[name] for real, name in special.items()}
    values = {k: v for k, v in config_dict.items() if k != "model_type"} | _map_token_ids(config_dict, real_to_here)
    config = AutoConfig.for_model(config_dict["model_type"], **values)
    torch.manual_seed(0)
    # fp32 like BlenderBot's build (from_config would take the spec's bfloat16), so the bench's
    # loading measurements do not depend on which model they load.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(**gen_dict | _map_token_ids(gen_dict, real_to_here))
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    t = time.monotonic()
    print(build_model(), f"{time.monotonic() - t:.1f}s")
    t = time.monotonic()
    print(build_chat_model(), f"{time.monotonic() - t:.1f}s")
