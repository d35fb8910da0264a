"""What the engine raises to its callers (defined in the torch-free `bot.engine_api`)."""

from bot.engine_api import EngineBusy, EngineClosed, EngineError, EngineSettingsError, GenerationTimeout

__all__ = ["EngineBusy", "EngineClosed", "EngineError", "EngineSettingsError", "GenerationTimeout"]
