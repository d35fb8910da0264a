"""What the engine raises to its callers."""


class EngineError(RuntimeError):
    """The model could not be loaded or failed to generate."""


class EngineBusy(EngineError):
    """Too many requests are waiting; try again in a moment."""


class EngineClosed(EngineError):
    """The engine has been closed and takes no more work."""


class GenerationTimeout(EngineError):
    """Generation ran past its deadline and was stopped."""
