"""ChatBot without a connection: intents, mention safety, and a failed command sync."""

from pathlib import Path

import discord
import pytest

from bot.client import ChatBot
from bot.core.chat import ChatService
from bot.history.sqlite import SQLiteHistoryStore
from config.settings import Settings
from tests.scripted_engine import ScriptedEngine


@pytest.fixture
async def bot(tmp_path: Path) -> ChatBot:
    chat = ChatService(ScriptedEngine(), SQLiteHistoryStore(tmp_path / "h.sqlite3", max_turns=4))
    return ChatBot(settings=Settings(discord_token="x", dev_guild_id=123456789012345678), chat=chat)


async def test_intents_and_no_pings(bot: ChatBot) -> None:
    assert bot.intents.message_content and bot.intents.guild_messages and bot.intents.dm_messages
    assert bot.allowed_mentions is not None and bot.allowed_mentions.to_dict() == {"parse": []}


async def test_failed_sync_is_one_log_line_not_a_crash(
    bot: ChatBot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    response = type("R", (), {"status": 403, "reason": "Forbidden"})()

    async def refuse(**kwargs: object) -> None:
        raise discord.Forbidden(response, {"code": 50001, "message": "Missing Access"})

    monkeypatch.setattr(bot.tree, "sync", refuse)
    await bot.sync_commands()
    assert "could not register slash commands DEV_GUILD_ID=123456789012345678" in caplog.text
    assert "applications.commands" in caplog.text


def test_no_warnings_about_voice_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """discord.py warns once per process that PyNaCl and davey are missing; this bot never joins voice."""
    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True)
    chat = ChatService(ScriptedEngine(), SQLiteHistoryStore(tmp_path / "h.sqlite3", max_turns=4))
    ChatBot(settings=Settings(discord_token="x"), chat=chat)
    assert "voice" not in caplog.text
