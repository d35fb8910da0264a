"""The entrypoint as a user runs it: `python -m bot` and `python -m bot --console`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "DISCORD_TOKEN is not set" in result.stderr and "--console" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_is_one_clear_line(tmp_path: Path) -> None:
    result = run_bot(tmp_path, env={"HISTORY_TURNS": "lots", "DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    assert result.stderr.strip() == "Configuration error: HISTORY_TURNS must be a whole number, got 'lots'"


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    result = run_bot(tmp_path, "--console", env={"MODEL_NAME": str(tmp_path / "no-such-model")})
    assert result.returncode == 1
    assert "Could not load the model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_console_answers_with_a_local_model(tmp_path: Path, tiny_model_dir: Path, precision: str) -> None:
    result = run_bot(
        tmp_path,
        "--console",
        env={"MODEL_NAME": str(tiny_model_dir), "PRECISION": precision, "LOG_LEVEL": "WARNING"},
        stdin="hello there\n\n/reset\nhow are you\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if "bot> " in line]
    assert len(replies) == 3 and "(history cleared)" in replies[1]
    assert all(r.split("bot> ", 1)[1].strip() for r in replies)
    assert "Traceback" not in result.stderr
