"""What the engine raises to its callers (defined in the torch-free `bot.core.engine_api`)."""

from bot.core.engine_api import EngineBusy, EngineClosed, EngineError, EngineSettingsError, GenerationTimeout

__all__ = ["EngineBusy", "EngineClosed", "EngineError", "EngineSettingsError", "GenerationTimeout"]
