"""A fake Discord (REST + gateway on 127.0.0.1) that the real discord.py client logs in to."""

from tests.fake_discord.harness import QUIET, BotFactory, BotHarness, bot_settings, start_bot
from tests.fake_discord.rest import Interaction, RestCall
from tests.fake_discord.server import CommandNotAvailable, FakeDiscord
from tests.fake_discord.world import Channel, User, World

__all__ = [
    "QUIET",
    "BotFactory",
    "BotHarness",
    "Channel",
    "CommandNotAvailable",
    "FakeDiscord",
    "Interaction",
    "RestCall",
    "User",
    "World",
    "bot_settings",
    "start_bot",
]
