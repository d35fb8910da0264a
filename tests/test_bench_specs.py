"""The bench's model specs (bench/models/): each loads as its family, runs on the engine, and the
bandwidth floor counts exactly the weights one decoding step reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench import bandwidth
from bench.build import SPECIAL_IDS, _map_token_ids
from bot.engine.causal import check_supported

SPECS = Path(__file__).resolve().parent.parent / "bench" / "models"
CHAT_SPECS = sorted(SPECIAL_IDS)


def _spec(name: str) -> tuple[dict, dict]:
    folder = SPECS / name
    return json.loads((folder / "config.json").read_text()), json.loads((folder / "generation_config.json").read_text())


def test_every_chat_spec_folder_is_listed() -> None:
    folders = {p.name for p in SPECS.iterdir() if p.is_dir() and p.name != "blenderbot-400M-distill"}
    assert folders == set(CHAT_SPECS)


@pytest.mark.parametrize("name", CHAT_SPECS)
def test_chat_spec_loads_as_a_family_the_engine_steps(name: str) -> None:
    config_dict, _ = _spec(name)
    values = {k: v for k, v in config_dict.items() if k != "model_type"}
    config = AutoConfig.for_model(config_dict["model_type"], **values)
    check_supported(config)
    assert config.num_hidden_layers == config_dict["num_hidden_layers"]


@pytest.mark.parametrize("name", CHAT_SPECS)
def test_every_special_token_id_maps_onto_the_bench_tokenizer(name: str) -> None:
    config_dict, gen_dict = _spec(name)
    real_to_here = {real: i for i, real in enumerate(SPECIAL_IDS[name])}
    for values in (config_dict, gen_dict):
        mapped = _map_token_ids(values, real_to_here)  # raises KeyError for an id with no special token
        assert set(mapped) == {k for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in values}


@pytest.mark.parametrize("name", CHAT_SPECS)
def test_bandwidth_floor_counts_the_linear_weights_of_a_step(name: str) -> None:
    config_dict, _ = _spec(name)
    values = {k: v for k, v in config_dict.items() if k != "model_type"}
    with torch.device("meta"):  # the full-size shape, no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config_dict["model_type"], **values))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bandwidth.causal_bytes_per_token(config_dict, 1) == linear
