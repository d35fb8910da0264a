"""The outcomes table and the growing-text helper, which the chat service, server and remote engine share."""

from __future__ import annotations

from typing import get_args

import pytest

from bot.core.engine_api import EngineBusy, EngineClosed, EngineError, EngineSettingsError, GenerationTimeout
from bot.core.outcomes import (
    ANSWERED,
    BUSY,
    CLOSING,
    EMPTY,
    FAILED,
    OUTCOMES,
    REPLY_KINDS,
    TIMEOUT,
    outcome_of,
    received,
    server_error,
)
from bot.core.partial import GrowingText
from bot.core.types import ReplyKind


def test_every_kind_is_one_row() -> None:
    """The type checker's list of kinds (`ReplyKind`) and the table hold the same kinds, once each."""
    assert len(set(REPLY_KINDS)) == len(OUTCOMES)
    assert set(REPLY_KINDS) == set(get_args(ReplyKind))
    assert all(o.notice for o in OUTCOMES if o is not ANSWERED)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (EngineBusy("full"), BUSY),
        (GenerationTimeout("slow"), TIMEOUT),
        (EngineClosed("bye"), CLOSING),
        (EngineError("broken"), FAILED),
        (EngineSettingsError("no room"), FAILED),
        (RuntimeError("a bug"), FAILED),
    ],
)
def test_an_exception_has_one_outcome(error: BaseException, outcome: object) -> None:
    assert outcome_of(error) is outcome


def test_an_answer_is_ok_unless_it_says_nothing() -> None:
    assert outcome_of(None, "hi") is ANSWERED
    assert outcome_of(None, "  \n") is EMPTY
    assert outcome_of(None, None) is EMPTY


def test_what_the_server_sends_reads_back_as_the_same_outcome() -> None:
    """The remote engine inverts the server's answer, except that any server's 503 means busy."""
    for outcome in (BUSY, TIMEOUT):
        status, _, kind = server_error(outcome.error("x"))  # type: ignore[misc]
        assert received(status=status) is outcome
        assert received(error_type=kind) is outcome
    assert received(status=503) is BUSY
    assert received(status=500) is FAILED
    assert received(error_type="something else") is FAILED
    assert server_error(GenerationTimeout("past 60s")) == (504, "the reply took too long: past 60s", "timeout")


def test_growing_text_reports_only_what_extends_what_was_shown() -> None:
    text = GrowingText()
    assert text.advance("Hel") == "Hel"
    assert text.advance("Hel") is None  # nothing new
    assert text.advance("Hello") == "lo"
    assert text.advance("Help") is None  # does not extend "Hello": skipped, not shown
    assert text.shown == "Hello"
    assert text.rest("Hello there") == " there"
    assert text.rest("Hello") == ""
    assert text.rest("Goodbye") is None
