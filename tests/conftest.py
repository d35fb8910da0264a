"""Shared fixtures: a tiny Blenderbot built once per test session, and engines loaded from it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine import Engine, EngineConfig
from tests.tiny_model import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Blenderbot (128 positions, 2 beams, 4 to 12 tokens) saved with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def engine_config(model_dir: Path, **overrides: object) -> EngineConfig:
    """fp32 on the CPU so replies are exactly reproducible."""
    values: dict[str, object] = {"model_name": str(model_dir), "device": "cpu", "precision": "fp32"}
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    async with Engine(engine_config(tiny_model_dir)) as running:
        yield running
