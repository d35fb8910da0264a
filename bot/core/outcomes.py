"""How a reply can end, in one table: its kind, what the chat service says, what the model server sends.

Every layer that turns an engine's exception into something else reads this table: the chat service
(the notice a person sees and the kind the metrics count), the model server (the HTTP status and
OpenAI error body it answers with) and the remote engine (which reads a server's status or error
type back into the same exceptions). A new way to fail is one more row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.core.engine_api import EngineBusy, EngineClosed, EngineError, GenerationTimeout
from bot.core.types import ReplyKind

BUSY_TEXT = "I'm busy with a lot of conversations right now. Please try again in a moment."
TIMEOUT_TEXT = "Sorry, that took me too long to think about. Could you try again, maybe in fewer words?"
ERROR_TEXT = "Sorry, something went wrong on my side and I couldn't answer. Please try again."
CLOSING_TEXT = "I'm restarting right now, so I can't answer this one. Please ask again in a minute."
EMPTY_REPLY_TEXT = "I'm not sure what to say to that. Could you tell me more?"
STOPPED_TEXT = "Stopped before I had written anything."


@dataclass(frozen=True)
class Outcome:
    """One way a reply ends.

    `error` is the engine exception that means it (None for an answer, empty or not); `notice` what
    the chat service posts instead of an answer; `status`, `error_type` and `message` what the model
    server answers with (`message` may name the exception as `{error}`). `received_statuses` and
    `received_types` are what a remote server's answer must carry to mean this outcome: any
    server's 503 means it is overloaded, so it reads as busy, not closing.
    """

    kind: ReplyKind
    error: type[EngineError] | None
    notice: str | None
    status: int
    error_type: str
    message: str
    received_statuses: tuple[int, ...] = ()
    received_types: tuple[str, ...] = ()


ANSWERED = Outcome("ok", None, None, 200, "", "")
EMPTY = Outcome("empty", None, EMPTY_REPLY_TEXT, 200, "", "")
STOPPED = Outcome("stopped", None, STOPPED_TEXT, 200, "", "")  # the Stop button, before the first word
BUSY = Outcome(
    "busy",
    EngineBusy,
    BUSY_TEXT,
    429,
    "engine_busy",
    "the engine is busy; try again in a moment",
    received_statuses=(429, 503),
    received_types=("engine_busy", "rate_limit_exceeded"),
)
TIMEOUT = Outcome(
    "timeout",
    GenerationTimeout,
    TIMEOUT_TEXT,
    504,
    "timeout",
    "the reply took too long: {error}",
    received_statuses=(504,),
    received_types=("timeout",),
)
CLOSING = Outcome("closing", EngineClosed, CLOSING_TEXT, 503, "engine_closed", "the engine is shutting down")
FAILED = Outcome("error", EngineError, ERROR_TEXT, 500, "engine_error", "the engine failed: {error}")

# Most specific first: every engine exception is an EngineError, so FAILED comes last among them.
OUTCOMES: tuple[Outcome, ...] = (ANSWERED, EMPTY, STOPPED, BUSY, TIMEOUT, CLOSING, FAILED)
REPLY_KINDS: tuple[ReplyKind, ...] = tuple(outcome.kind for outcome in OUTCOMES)


def outcome_of(error: BaseException | None, text: str | None = None) -> Outcome:
    """How a reply ended: the outcome of what the engine raised, else an answer (empty when it says nothing).

    Anything that is not an engine exception (a bug) is FAILED too.
    """
    if error is None:
        return ANSWERED if text and text.strip() else EMPTY
    for outcome in OUTCOMES:
        if outcome.error is not None and isinstance(error, outcome.error):
            return outcome
    return FAILED


def received(status: int | None = None, error_type: str | None = None) -> Outcome:
    """The outcome a remote server's error status (or, mid-stream, error type) means; FAILED when none."""
    for outcome in OUTCOMES:
        if status in outcome.received_statuses or (error_type and error_type in outcome.received_types):
            return outcome
    return FAILED


def server_error(error: BaseException) -> tuple[int, str, str]:
    """The model server's HTTP status, message and OpenAI error type for what the engine raised."""
    outcome = outcome_of(error)
    return outcome.status, outcome.message.format(error=error), outcome.error_type
