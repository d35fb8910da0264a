"""Build a tiny, randomly initialised Qwen2-shaped chat model and its tokenizer at test time.

Like `tests/tiny_model.py` for BlenderBot: a small byte-level BPE tokenizer trained with
`tokenizers`, ChatML special tokens and a ChatML-style Jinja chat template, a decoder-only model of
the Qwen2 family with random weights (grouped-query attention, tied embeddings), saved with
`save_pretrained` so the product loads it through its own code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.tiny_model import CORPUS

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_causal_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 400,
    max_position_embeddings: int = 512,
    chat_template: str | None = CHATML,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny Qwen2 chat model (config, weights, tokenizer with its template, generation config)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))
    end_of_text, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=end_of_text,
        eos_token_id=im_end,
        initializer_range=0.5,
    )
    model = Qwen2ForCausalLM(config).eval()
    defaults = {
        "bos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "eos_token_id": [im_end, end_of_text],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "max_new_tokens": 16,
    }
    model.generation_config = GenerationConfig(**(defaults | (generation or {})))
    model.save_pretrained(str(out))
    (out / "TINY_MODEL.json").write_text(json.dumps({"seed": seed, "family": "qwen2"}))
    return out


if __name__ == "__main__":
    print(build_tiny_causal_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-causal-model"))
