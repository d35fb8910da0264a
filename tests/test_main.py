"""The entrypoint as a user runs it: `python -m bot` and `python -m bot --console`."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.__main__ import HTTP_LOGGERS, LIBRARY_LOGGERS, setup_logging
from bot.console import CONSOLE_HELP, CONSOLE_UNKNOWN, console_answer, console_command
from bot.core.chat import ChatService
from bot.core.types import Conversation, Turn
from bot.engine import Engine
from bot.history import open_store
from tests.scripted_engine import ScriptedEngine

ROOT = Path(__file__).resolve().parent.parent


def run_bot(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the bot from an empty directory (no .env), with only the given settings."""
    base = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "MODEL_NAME")}
    base.update({"PYTHONPATH": str(ROOT), "HISTORY_DB": str(tmp_path / "h.sqlite3"), "HF_HUB_OFFLINE": "1"})
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=tmp_path,
        env=base,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_token_explains_what_to_do(tmp_path: Path) -> None:
    result = run_bot(tmp_path)
    assert result.returncode == 2
    assert "DISCORD_TOKEN is not set" in result.stderr
    # What works from a fresh shell, where a bare `python` has none of the packages in .venv.
    assert "make console" in result.stderr and ".venv/bin/python -m bot --console" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("history_db", "says"),
    [
        ("/proc/nope/h.sqlite3", "cannot be created"),  # a folder that cannot be made
        (".", "is a folder"),
        ("not-a-database.txt", "is not an SQLite database"),
    ],
)
def test_bad_history_db_is_one_line_naming_the_key(tmp_path: Path, history_db: str, says: str) -> None:
    (tmp_path / "not-a-database.txt").write_text("hello, I am not a database\n" * 200)
    # Discord mode: the token is never tried, since the history is opened before logging in.
    result = run_bot(tmp_path, env={"HISTORY_DB": history_db, "DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0], result.stderr
    assert result.stderr.startswith(f"Configuration error: HISTORY_DB {history_db} ") and says in result.stderr


@pytest.mark.parametrize(
    ("which", "says"),
    [
        ("wrong password", "was refused by the server"),
        ("no such database", "names a database that does not exist"),
        ("unreachable", "cannot be reached"),
    ],
)
def test_unusable_postgresql_history_db_is_one_line_without_the_password(
    tmp_path: Path, request: pytest.FixtureRequest, which: str, says: str
) -> None:
    if which == "unreachable":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens there once the socket is closed
        url, shown = f"postgresql://bot:hunter2@127.0.0.1:{port}/chat", f"postgresql://bot:***@127.0.0.1:{port}/chat"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.url("nope") if which == "no such database" else server.url(password="hunter2")
        shown = url.replace(url.split(":")[2].split("@")[0], "***")
    result = run_bot(tmp_path, env={"HISTORY_DB": url, "DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0], result.stderr
    assert result.stderr.startswith(f"Configuration error: HISTORY_DB {shown} ") and says in result.stderr
    assert "hunter2" not in result.stderr and "s3cret" not in result.stderr


def test_bad_setting_is_one_clear_line(tmp_path: Path) -> None:
    result = run_bot(tmp_path, env={"HISTORY_TURNS": "lots", "DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    assert result.stderr.strip() == "Configuration error: HISTORY_TURNS must be a whole number, got 'lots'"


@pytest.mark.parametrize("model_name", ["/nonexistent/dir", "./tiny", "models/../tiny"])
def test_missing_local_model_says_the_path_does_not_exist(tmp_path: Path, model_name: str) -> None:
    result = run_bot(tmp_path, "--console", env={"MODEL_NAME": model_name})
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"Configuration error: MODEL_NAME {model_name} does not exist (no folder at "
        + str(Path(os.path.abspath(tmp_path / model_name)))
        + ")"
    )


def test_unreachable_hub_is_one_quick_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a loopback port with nobody listening: the hub "cannot be reached"
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    result = run_bot(
        tmp_path,
        "--console",
        env={"MODEL_NAME": "facebook/blenderbot-400M-distill", "HF_HUB_OFFLINE": "", "HF_ENDPOINT": endpoint}
        | {"HF_HOME": str(tmp_path / "hf"), "LOG_LEVEL": "WARNING"},
    )
    assert result.returncode == 1
    message = result.stderr.strip()
    assert "\n" not in message and "Retry" not in message, result.stderr
    assert message.startswith(
        "Could not load the model 'facebook/blenderbot-400M-distill': it could not be downloaded: the Hugging "
        f"Face hub ({endpoint}) cannot be reached ("
    )
    assert "Connection refused" in message and message.endswith("set MODEL_NAME to a local folder")
    assert time.monotonic() - started < 30  # no retries (huggingface_hub's take about 46 s)


def test_console_answers_with_an_int8_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """int8, the CPU default; test_console_keeps_its_own_history runs the console in fp32."""
    result = run_bot(
        tmp_path,
        "--console",
        env={"MODEL_NAME": str(tiny_model_dir), "PRECISION": "int8", "LOG_LEVEL": "WARNING"},
        stdin="hello there\n\n/reset\nhow are you\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if "bot> " in line]
    assert len(replies) == 3 and "(history cleared)" in replies[1]
    assert all(r.split("bot> ", 1)[1].strip() for r in replies)
    assert "Traceback" not in result.stderr


async def test_console_keeps_its_own_history(tmp_path: Path, tiny_model_dir: Path, tiny_engine: Engine) -> None:
    db = tmp_path / "h.sqlite3"  # HISTORY_DB, as run_bot sets it
    discord_turns = [Turn("user", "do you have any pets"), Turn("bot", "yes i have a dog")]
    store = await open_store(db, max_turns=12)
    await store.append(Conversation(channel_id=0), 5, *discord_turns)  # channel 0: where the console used to write
    await store.close()
    result = await asyncio.to_thread(
        run_bot,
        tmp_path,
        "--console",
        env={"MODEL_NAME": str(tiny_model_dir), "DEVICE": "cpu", "PRECISION": "fp32", "LOG_LEVEL": "INFO"},
        stdin="hello there\n/help\n/shrug hi\n\n/reset\nhello there\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "Nothing said here is kept" in result.stdout
    replies = [line.split("bot> ", 1)[1] for line in result.stdout.splitlines() if "bot> " in line]
    # Answered as a fresh conversation, not one that carries on the Discord history of channel 0...
    hello = [Turn("user", "hello there")]
    assert replies[0] == await tiny_engine.reply(hello) != await tiny_engine.reply(discord_turns + hello)
    # ...and the console's commands are the console's, never sent to the model.
    assert replies[1:4] == [CONSOLE_HELP, CONSOLE_UNKNOWN.format(command="/shrug"), "(history cleared)"]
    assert replies[4] == replies[0]  # after /reset, a fresh conversation again
    store = await open_store(db, max_turns=12)
    assert await store.counts() == (1, 2) and await store.get(Conversation(channel_id=0)) == discord_turns
    await store.close()
    # Logs into a pipe or a file carry no colour codes.
    assert "loading " in result.stderr and "\x1b[" not in result.stderr


@pytest.mark.parametrize(
    ("text", "command"),
    [("/help", "/help"), ("/Reset now", "/reset"), ("/shrug", "/shrug"), ("hello /help", None), ("/ hi", None)],
)
def test_console_command(text: str, command: str | None) -> None:
    assert console_command(text) == command


async def test_console_help_and_unknown_commands_never_reach_the_model(
    chat: ChatService, scripted_engine: ScriptedEngine
) -> None:
    assert await console_answer(chat, "/help", "/help") == CONSOLE_HELP
    assert "/help lists the commands" in await console_answer(chat, "/weather paris", "/weather")
    assert scripted_engine.seen == []
    assert await console_answer(chat, "hello", None) == "re: hello"


@pytest.mark.parametrize("tty", [False, True])
def test_log_colours_only_on_a_terminal(tty: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stream = Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("NO_COLOR", raising=False)
    for key in ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        monkeypatch.setenv(key, "error")
    root = logging.getLogger()
    quieted = LIBRARY_LOGGERS + HTTP_LOGGERS
    before = (list(root.handlers), root.level, [logging.getLogger(n).level for n in quieted])
    try:
        setup_logging(logging.INFO)
        logging.getLogger("bot").info("hello")
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("httpx").info("HTTP Request: POST http://engine/v1/chat/completions")
    finally:
        for handler in set(root.handlers) - set(before[0]):
            root.removeHandler(handler)
        root.setLevel(before[1])
        for name, level in zip(quieted, before[2], strict=True):
            logging.getLogger(name).setLevel(level)
    assert "hello" in stream.getvalue() and ("\x1b[" in stream.getvalue()) == tty
    assert "Retry" not in stream.getvalue() and "HTTP Request" not in stream.getvalue()
    assert logging.getLogger("huggingface_hub").handlers == []  # its lines are not written twice


@pytest.mark.parametrize("num_beams", ["1", "2"])
def test_console_prints_the_same_replies_streamed_or_not(tmp_path: Path, tiny_model_dir: Path, num_beams: str) -> None:
    """Greedy replies are printed as they are written; what ends up on the screen is the same reply."""

    def replies(stream: str) -> list[str]:
        result = run_bot(
            tmp_path,
            "--console",
            env={"MODEL_NAME": str(tiny_model_dir), "NUM_BEAMS": num_beams, "STREAM_REPLIES": stream}
            | {"LOG_LEVEL": "WARNING"},
            stdin="hello there\nwhat do you like to do for fun\n/quit\n",
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return [line.split("bot> ", 1)[1] for line in result.stdout.splitlines() if "bot> " in line]

    streamed, whole = replies("true"), replies("false")
    assert len(whole) == 2 and all(whole)
    assert streamed == whole


def test_a_chat_model_without_a_chat_template_is_refused_at_start(tmp_path: Path) -> None:
    from tests.tiny_causal_model import build_tiny_causal_model

    model_dir = build_tiny_causal_model(tmp_path / "no-template", chat_template=None)
    result = run_bot(tmp_path, "--console", env={"MODEL_NAME": str(model_dir), "LOG_LEVEL": "WARNING"}, stdin="hi\n")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"Could not load the model '{model_dir}': it has no chat template, so there is no way to turn a "
        "conversation into its prompt"
    )


def test_bad_metrics_port_is_one_line(tmp_path: Path) -> None:
    result = run_bot(tmp_path, env={"METRICS_PORT": "99999", "DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    assert result.stderr.strip() == "Configuration error: METRICS_PORT must be between 1 and 65535, got 99999"


def test_metrics_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Checked before the history is opened or Discord is contacted: the token is never tried.
        result = run_bot(tmp_path, env={"METRICS_PORT": str(port), "DISCORD_TOKEN": "x"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Configuration error: METRICS_PORT {port} on METRICS_HOST 127.0.0.1 cannot be opened")
    assert "already in use" in lines[0]
    assert not (tmp_path / "h.sqlite3").exists()
