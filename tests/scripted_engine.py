"""A scripted stand-in for the engine, and the chat service over it, for tests without a model.

A pytest plugin (see `pytest_plugins` in tests/conftest.py): its fixtures reach every test without an import."""

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from bot.chat import ChatService
from bot.history import HistoryStore
from bot.types import Turn


class ScriptedEngine:
    """Answers with the text it was asked about; can be told to fail or to wait."""

    def __init__(self) -> None:
        self.seen: list[list[Turn]] = []
        self.fail: Exception | None = None
        self.answer: str | None = None
        self.gate: asyncio.Event | None = None

    async def reply(self, history: Sequence[Turn]) -> str:
        self.seen.append(list(history))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.answer if self.answer is not None else "re: " + history[-1].text

    def stats(self):  # pragma: no cover - not used here
        raise NotImplementedError


@pytest.fixture
def scripted_engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def chat(scripted_engine: ScriptedEngine, tmp_path: Path) -> ChatService:
    """The chat service over `scripted_engine` and a history file of its own."""
    return ChatService(scripted_engine, HistoryStore(tmp_path / "h.sqlite3", max_turns=10))
