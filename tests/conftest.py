"""Shared fixtures: a tiny Blenderbot and a tiny chat model, each built once per test session; a real engine on
the Blenderbot (`tiny_engine`); and, from tests/scripted_engine.py, a scripted stand-in (`scripted_engine`) with
a chat service over it (`chat`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine import Engine, EngineConfig
from tests.tiny_causal_model import build_tiny_causal_model
from tests.tiny_model import build_tiny_model

# Fixture modules shared by every test (imported here rather than into each test module).
pytest_plugins = ["tests.scripted_engine", "tests.postgres", "tests.serve_app"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Blenderbot (128 positions, 2 beams, 4 to 12 tokens) saved with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2-shaped chat model with a ChatML template (replies of up to 16 tokens)."""
    return build_tiny_causal_model(tmp_path_factory.mktemp("tiny-chat-model"))


def engine_config(model_dir: Path, **overrides: object) -> EngineConfig:
    """fp32 on the CPU so replies are exactly reproducible."""
    values: dict[str, object] = {"model_name": str(model_dir), "device": "cpu", "precision": "fp32"}
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def tiny_engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    """A real, running engine on the tiny model."""
    async with Engine(engine_config(tiny_model_dir)) as running:
        yield running
