"""A scripted stand-in for the engine, and the chat service over it, for tests without a model.

A pytest plugin (see `pytest_plugins` in tests/conftest.py): its fixtures reach every test without an import."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from bot.core.chat import ChatService
from bot.core.types import Turn
from bot.engine import EngineStats
from bot.history.sqlite import SQLiteHistoryStore


class ScriptedEngine:
    """Answers with the text it was asked about; can be told to fail, to wait, or to stream.

    Streaming (`can_stream` and `stream_words`): the answer is reported word by word to `on_partial`,
    `word_delay` seconds apart; `fail_after_words` makes it fail with `fail` after that many words.
    """

    def __init__(self) -> None:
        self.seen: list[list[Turn]] = []
        self.fail: Exception | None = None
        self.answer: str | None = None
        self.gate: asyncio.Event | None = None
        self.can_stream = False
        self.stream_words = False
        self.word_delay = 0.0
        self.fail_after_words: int | None = None
        self.system_prompts: list[str | None] = []  # what each reply was asked with (None: SYSTEM_PROMPT)
        self.context_words: int | None = None  # a persona of more words than this is refused as too long
        self.uses_system_prompt = True
        self.answers: list[str] = []  # taken in turn, before `answer`, one per reply
        self.cancelled = 0  # replies whose caller went away (a Stop button) before they were finished
        self.cancelled_at: list[float] = []  # when each was (time.monotonic())
        self.forgotten = 0  # how often it was told to drop its kept conversations (/forget-me)

    async def reply(
        self,
        history: Sequence[Turn],
        on_partial: Callable[[str], None] | None = None,
        *,
        system_prompt: str | None = None,
    ) -> str:
        self.seen.append(list(history))
        self.system_prompts.append(system_prompt)
        try:
            return await self._reply(history, on_partial)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancelled_at.append(time.monotonic())
            raise

    async def _reply(self, history: Sequence[Turn], on_partial: Callable[[str], None] | None) -> str:
        if self.gate is not None:
            await self.gate.wait()
        if self.answers:
            answer = self.answers.pop(0)
        else:
            answer = self.answer if self.answer is not None else "re: " + history[-1].text
        if on_partial is not None and self.can_stream and self.stream_words:
            words = answer.split(" ")
            for count in range(1, len(words) + 1):
                if self.fail is not None and self.fail_after_words is not None and count > self.fail_after_words:
                    raise self.fail
                await asyncio.sleep(self.word_delay)
                on_partial(" ".join(words[:count]).strip())
        if self.fail is not None:
            raise self.fail
        return answer

    def forget_cached_conversations(self) -> int:
        self.forgotten += 1
        return 0

    async def check_system_prompt(self, text: str) -> str | None:
        words = len(text.split())
        if self.context_words is not None and words > self.context_words:
            return f"it takes {words} of the {self.context_words} words this engine reads"
        return None

    def stats(self) -> EngineStats:
        """What /stats and the metrics read: the requests seen, nothing measured."""
        return EngineStats(
            model="scripted",
            device="cpu",
            precision="fp32",
            queue_depth=0,
            running=0,
            replies=len(self.seen),
            latency_p50_s=None,
            latency_p95_s=None,
            queue_wait_p50_s=None,
            queue_wait_p95_s=None,
            tokens_per_second=None,
            uptime_s=0.0,
        )


@pytest.fixture
def scripted_engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
async def chat(scripted_engine: ScriptedEngine, tmp_path: Path) -> AsyncIterator[ChatService]:
    """The chat service over `scripted_engine` and a history file of its own (closed after the test)."""
    history = await SQLiteHistoryStore.open(tmp_path / "h.sqlite3", max_turns=10)
    yield ChatService(scripted_engine, history)
    await history.close()
