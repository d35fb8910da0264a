"""The model behind an OpenAI-compatible server (ENGINE_URL); importing it never imports torch."""

from bot.remote.engine import CONTEXT_RETRIES, RemoteConfig, RemoteEngine

__all__ = ["CONTEXT_RETRIES", "RemoteConfig", "RemoteEngine"]
