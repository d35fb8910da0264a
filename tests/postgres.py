"""A throwaway PostgreSQL server for the tests: started once per session in a temp dir, always stopped.

A pytest plugin (see `pytest_plugins` in tests/conftest.py). `postgres_server` is the server (session
scope); `postgres_url` is a fresh, empty database on it for one test (dropped afterwards), as a
`postgresql://` URL that any number of processes may share. Without the server binaries the tests
that use them are skipped, saying how to install them.

The server listens on 127.0.0.1 at a free port (password login, as a real deployment would) and on a
unix socket in its own folder. initdb refuses to run as root, so under root the server runs as the
`postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "install them with `apt-get install -y postgresql` (or set PG_BIN to their folder)"
PASSWORD = "s3cret-test-password"
USER = "postgres"


def find_bin() -> Path | None:
    """The folder with initdb and pg_ctl: $PG_BIN, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    which = shutil.which("pg_ctl")
    candidates.append(str(Path(which).parent) if which else "")
    for folder in candidates:
        if folder and (Path(folder) / "pg_ctl").is_file() and (Path(folder) / "initdb").is_file():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bin: Path
    root: Path
    port: int
    run_as: str | None  # the system user running the server when the tests run as root
    _names: itertools.count[int]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", *, password: str = PASSWORD, user: str = USER) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout}")

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        self.start_again()

    def start_again(self) -> None:
        """Start the server on its existing data folder (same port), as after `stop`; waits until it accepts
        connections."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server if it runs: `immediate` (the default, for cleaning up) drops everything at once,
        `fast` is an administrator's ordinary shutdown (clients are disconnected, a checkpoint is written)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Unavailable(Exception):
    """No PostgreSQL server can be started here; the message says why and how to install one."""


def start_server() -> PostgresServer:
    """A new PostgreSQL server in a temp dir, running; `discard` stops it and deletes its files."""
    folder = find_bin()
    if folder is None:
        raise Unavailable(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}")
    run_as = None
    if os.geteuid() == 0:
        try:
            run_as = pwd.getpwnam("postgres").pw_name
        except KeyError:
            hint = "running as root and there is no `postgres` user to run the server as; " + INSTALL_HINT
            raise Unavailable(hint) from None
    root = Path(tempfile.mkdtemp(prefix="bot-pg-"))  # short, and outside pytest's 0700 folders (for run_as)
    server = PostgresServer(folder, root, _free_port(), run_as, itertools.count(1))
    try:
        server.start()
    except BaseException:
        discard(server)
        raise
    return server


def discard(server: PostgresServer) -> None:
    try:
        server.stop()
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


@contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A server for the length of a `with` block, stopped and deleted on the way out (also on failure)."""
    server = start_server()
    try:
        yield server
    finally:
        discard(server)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test session (skips the test when the binaries are not installed)."""
    try:
        server = start_server()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        discard(server)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test, as a `postgresql://` URL (with its password); dropped after."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


def _server_options(server: PostgresServer) -> str:
    """The postgres options `PostgresServer.start` runs the server with (kept the same here)."""
    return (
        f"-p {server.port} -k {server.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        " -c synchronous_commit=off -c full_page_writes=off"
    )


def stop_fast(server: PostgresServer) -> None:
    """Stop a running server as an operator restarting it would: `pg_ctl stop -m fast` (open sessions are
    ended and their transactions rolled back); returns once it is down. `start_again` brings it back."""
    server._run("pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "-t", "60", "stop")


def start_again(server: PostgresServer) -> None:
    """Start a stopped server again on its data dir, at the same port and with the same options."""
    server._run(
        "pg_ctl", "-D", str(server.data), "-o", _server_options(server), "-l", str(server.root / "log"), "-w",
        "-t", "60", "start",
    )  # fmt: skip
