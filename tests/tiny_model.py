"""Build a tiny, randomly initialised Blenderbot and its tokenizer at test time.

The hub cannot be reached here, so tests train a small byte-level BPE tokenizer with `tokenizers`,
build a Blenderbot of the same family with random weights, and `save_pretrained` both to a
directory that the product then loads through its own loading code (`MODEL_NAME=<dir>`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CORPUS = [
    "hello there how are you today",
    "i am fine thank you and you",
    "what do you like to do for fun",
    "i like to read books and play games with my friends",
    "the weather is nice and sunny today so we went outside",
    "do you have any pets at home",
    "yes i have a dog and two cats",
    "tell me something interesting about space and the stars",
    "music is my favourite thing in the whole world",
    "where do you live and what do you do for work",
]


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_position_embeddings: int = 128,
    vocab_size: int = 600,
    d_model: int = 32,
    min_length: int = 4,
    max_length: int = 12,
    num_beams: int = 2,
    init_std: float = 0.5,
) -> Path:
    """Write a tiny Blenderbot (config, weights, tokenizer, generation config) to `out_dir`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        BlenderbotConfig,
        BlenderbotForConditionalGeneration,
        BlenderbotTokenizer,
        GenerationConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_dir = out / "_bpe"
    raw_dir.mkdir(exist_ok=True)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 20,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        show_progress=False,
    )
    bpe.save_model(str(raw_dir))
    # `<mask>` goes last, as in the real tokenizer.
    tokenizer = BlenderbotTokenizer(
        vocab=str(raw_dir / "vocab.json"),
        merges=str(raw_dir / "merges.txt"),
        add_eos_token=True,
    )
    tokenizer.save_pretrained(str(out))

    torch.manual_seed(seed)
    config = BlenderbotConfig(
        vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        forced_eos_token_id=2,
        scale_embedding=True,
        init_std=init_std,
        tie_word_embeddings=True,
    )
    model = BlenderbotForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        num_beams=num_beams,
        min_length=min_length,
        max_length=max_length,
        no_repeat_ngram_size=3,
        forced_eos_token_id=2,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model.save_pretrained(str(out))
    (out / "TINY_MODEL.json").write_text(json.dumps({"seed": seed, "d_model": d_model}))
    return out


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"))
