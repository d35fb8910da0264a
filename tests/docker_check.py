"""`make docker-test`: build the Docker image, run the bot in a container against the fake Discord here.

Not part of `make test` (which must not need Docker), and not collected by pytest (no `test_` name).
Run it as `.venv/bin/python -m tests.docker_check`; it exits 0 when every check passed. Steps:

1. A Docker daemon: the running one, else `dockerd` started here (root only) with the first storage
   driver that works (overlay2, then vfs), without iptables and the bridge network if those fail; it
   is stopped again at the end. Containers and builds use the host's network (`--network host`).
2. The base image `debian:bookworm-slim`: when it is missing (no registry can be reached here), it is
   made from Debian's packages with `debootstrap --variant=minbase bookworm` on the mirror apt uses,
   trimmed as the slim image is, and `docker import`ed.
3. The image, built with pip's settings on this machine: a local wheel directory holding the CPU
   torch (pip's find-links, or TORCH_WHEEL_DIR) becomes the torch source, local `file://` indexes
   become extra indexes, and pip's CA bundle (`cert`) is trusted by the build's pip too, each served
   over HTTP on 127.0.0.1 for the build.
4. The bot in a container (tini, `python -m bot`, user bot) on a tiny model mounted read-only,
   pointed at the fake Discord the way the end-to-end process tests point `python -m bot` at it: it
   must answer a mention with the reply the same model gives here, report healthy (HEALTHCHECK on
   /health with METRICS_PORT), then stop on `docker stop` (SIGTERM) with exit code 0, no traceback,
   the gateway closed, the token never logged, and its SQLite history in the volume.
5. `docker compose config` (or docker-compose) for each profile of compose.yaml, when a compose
   client is installed.

`--postgres` also runs step 4 with HISTORY_DB on a throwaway PostgreSQL server here (tests/postgres.py;
no registry, so not the compose file's postgres image), and `--serve` builds the serve image
(WITH_SERVE=1) and runs step 4 with the model in a `python -m bot.serve` container (ENGINE_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = "discord-chatbot:latest"
SERVE_IMAGE = "discord-chatbot:serve"  # WITH_SERVE=1: Ray Serve too
SERVE_COMMAND = ["python", "-m", "bot.serve"]
BASE_IMAGE = "debian:bookworm-slim"
TORCH_VERSION = "2.13.0"
IMAGE_PYTHON_TAG = "cp311"  # bookworm's python3 is 3.11
PROFILES = ("sqlite", "postgres", "serve")
BUILD_PORT = 47391  # where the build's pip finds this machine's wheels and indexes (see FileServer)
HISTORY = "/app/data/history.sqlite3"  # HISTORY_DB's default in the image's working directory
# What debian:bookworm-slim leaves out of every package (docs, man pages, translations).
SLIM_DPKG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


def say(text: str) -> None:
    print(f"[docker-test {time.strftime('%H:%M:%S')}] {text}", flush=True)


class CheckFailed(Exception):
    """A step failed; the message says which and why."""


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args[:3])} ... failed ({result.returncode}):\n{result.stderr.strip()}")
    return result


def daemon_up() -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ----- 1. the daemon ---------------------------------------------------------------------------------


@contextlib.contextmanager
def docker_daemon(log_path: Path) -> Iterator[None]:
    """The running daemon, or one started here for the duration (and stopped after)."""
    if shutil.which("docker") is None:
        raise CheckFailed("no docker client: install Docker (on Debian: apt-get install -y docker.io)")
    if daemon_up():
        say("using the running Docker daemon")
        yield
        return
    if shutil.which("dockerd") is None:
        raise CheckFailed("the Docker daemon is not running and there is no dockerd (apt-get install -y docker.io)")
    if os.geteuid() != 0:
        raise CheckFailed("the Docker daemon is not running; start it (dockerd needs root), then run this again")
    attempts = [
        ["--storage-driver=overlay2"],
        ["--storage-driver=vfs"],
        ["--storage-driver=overlay2", "--iptables=false", "--bridge=none"],
        ["--storage-driver=vfs", "--iptables=false", "--bridge=none"],
    ]
    process: subprocess.Popen[bytes] | None = None
    for flags in attempts:
        with log_path.open("ab") as log:
            process = subprocess.Popen(["dockerd", *flags], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 40
        while process.poll() is None and time.monotonic() < deadline and not daemon_up():
            time.sleep(0.5)
        if process.poll() is None and daemon_up():
            say(f"started dockerd {' '.join(flags)} (pid {process.pid}, log {log_path})")
            break
        stop_process(process)
        say(f"dockerd {' '.join(flags)} did not come up; see {log_path}")
        process = None
    if process is None:
        raise CheckFailed(f"could not start dockerd with any storage driver; its log: {log_path}")
    try:
        yield
    finally:
        stop_process(process)
        say("stopped the dockerd started here")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ----- 2. the base image -----------------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt uses here (not the security one), from /etc/apt/sources.list*."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    files += sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for name in files:
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines():
                line = line.split("#", 1)[0]
                for url in re.findall(r"\b(?:https?|file)://\S+", line):
                    if "security" not in url and url.rstrip("/").endswith("/debian"):
                        return url
    return "http://deb.debian.org/debian"


def ensure_base_image(workdir: Path) -> None:
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        say(f"base image {BASE_IMAGE} is here")
        return
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise CheckFailed(
            f"{BASE_IMAGE} is missing and cannot be pulled or made here: "
            "`docker pull debian:bookworm-slim`, or run this as root with debootstrap installed"
        )
    mirror = debian_mirror()
    root = workdir / "rootfs"
    say(f"{BASE_IMAGE} is missing: making it with debootstrap --variant=minbase bookworm {mirror} (a few minutes)")
    started = time.monotonic()
    log = workdir / "debootstrap.log"
    with log.open("wb") as out:
        code = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), mirror], stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        raise CheckFailed(f"debootstrap failed ({code}); its log:\n{log.read_text(errors='replace')[-3000:]}")
    (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG)
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Binary::apt::APT::Keep-Downloaded-Packages "false";\n'
    )
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n"
    )
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "var/log/*.log",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
        "usr/share/doc/*",
    ):
        for path in glob.glob(str(root / pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, text=True)
    tar.wait()
    shutil.rmtree(root, ignore_errors=True)
    if tar.returncode != 0 or imported.returncode != 0:
        raise CheckFailed(f"docker import failed: {imported.stderr.strip()}")
    say(f"made {BASE_IMAGE} in {time.monotonic() - started:.0f}s ({image_size(BASE_IMAGE)})")


# ----- 3. the image ----------------------------------------------------------------------------------


class FileServer:
    """Local directories over HTTP on 127.0.0.1 (a thread), each under a prefix, for the build's pip.

    The port is fixed when it is free (BUILD_PORT): the URLs are build arguments, part of the build
    cache's key, so the same URLs let a second build reuse the installed packages.
    """

    def __init__(self, directories: dict[str, str]) -> None:
        self.directories = directories
        served = self.directories

        class Handler(http.server.SimpleHTTPRequestHandler):
            def translate_path(self, path: str) -> str:
                prefix, _, rest = urllib.parse.unquote(path.split("?")[0]).lstrip("/").partition("/")
                if prefix not in served:
                    return "/nonexistent"
                return os.path.join(served[prefix], *[p for p in rest.split("/") if p not in ("", "..")])

            def log_message(self, format: str, *args: object) -> None:
                pass

        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", BUILD_PORT), Handler)
        except OSError:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pip_settings() -> dict[str, list[str]]:
    """find-links, index-url and extra-index-url as pip is configured here (files and PIP_* variables)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found: dict[str, list[str]] = {"find-links": [], "index-url": [], "extra-index-url": [], "cert": []}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in found:
            for item in value.strip().strip("'\"").split():
                if item not in found[name]:
                    found[name].append(item)
    return found


def torch_wheel_dir(settings: dict[str, list[str]]) -> str | None:
    """A local directory holding the CPU torch wheel for the image's Python, if there is one."""
    candidates = [os.environ.get("TORCH_WHEEL_DIR", ""), *settings["find-links"]]
    for candidate in candidates:
        directory = candidate.removeprefix("file://")
        if directory and glob.glob(os.path.join(directory, f"torch-{TORCH_VERSION}+cpu-{IMAGE_PYTHON_TAG}-*.whl")):
            return directory
    return None


def build_image(workdir: Path, tag: str) -> float:
    settings = pip_settings()
    served: dict[str, str] = {}
    build_args: list[str] = []
    base = f"http://127.0.0.1:{BUILD_PORT}"
    wheels = torch_wheel_dir(settings)
    if wheels:
        served["torch"] = wheels
        build_args += ["--build-arg", f"TORCH_FIND_LINKS={base}/torch/"]
        say(f"torch {TORCH_VERSION}+cpu from the local wheel directory {wheels}")
    else:
        say("no local CPU torch wheel: the build takes torch from https://download.pytorch.org/whl/cpu")
    extra = []
    for i, url in enumerate(settings["extra-index-url"]):
        if url.startswith("file://"):  # .../simple, whose pages link to files beside it
            simple = Path(url.removeprefix("file://").rstrip("/"))
            served[f"index{i}"] = str(simple.parent)
            extra.append(f"{base}/index{i}/{simple.name}/")
        else:
            extra.append(url)
    if extra:
        build_args += ["--build-arg", "EXTRA_INDEX_URL=" + " ".join(extra)]
    if settings["cert"]:  # a CA bundle pip trusts here (a network that inspects TLS): the build's pip too
        cert = Path(settings["cert"][0])
        served["ca"] = str(cert.parent)
        build_args += ["--build-arg", f"PIP_CERT_URL={base}/ca/{cert.name}"]
    if settings["index-url"]:
        build_args += ["--build-arg", f"INDEX_URL={settings['index-url'][0]}"]
    server = FileServer(served)
    try:
        if server.url != base:
            say(f"port {BUILD_PORT} is taken: serving on {server.url} (the build cache will not be reused)")
            build_args = [arg.replace(base, server.url) for arg in build_args]
        if tag == SERVE_IMAGE:
            build_args += ["--build-arg", "WITH_SERVE=1"]
        log_path = workdir / f"build-{tag.rsplit(':', 1)[-1]}.log"
        say(f"building {tag} (log: {log_path})")
        started = time.monotonic()
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx plugin needed
        with log_path.open("w") as log:
            process = subprocess.Popen(
                ["docker", "build", "--force-rm", "--network", "host", "-t", tag, *build_args, str(REPO)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if line.startswith("Step "):
                    say("  " + line.strip()[:110])
            code = process.wait()
        if code != 0:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise CheckFailed(f"docker build failed ({code}):\n{tail}")
        return time.monotonic() - started
    finally:
        server.close()


def image_size(image: str) -> str:
    size = int(docker("image", "inspect", image, "--format", "{{.Size}}").stdout.strip())
    return f"{size / 1e6:.0f} MB"


# ----- 4. the bot in a container ---------------------------------------------------------------------


async def run(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        raise CheckFailed(f"{' '.join(args[:3])} ... took over {timeout}s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def docker_run_command(name: str, image: str, env: dict[str, str], *options: str) -> list[str]:
    command = ["docker", "run", "--detach", "--name", name, "--health-interval", "2s", *options]
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    return [*command, image]


async def check_bot(model_dir: Path, mode: str) -> None:
    """The bot in a container (host network) against the fake Discord: `sqlite` (the model in the bot, history
    in the volume), `postgres` (history in a PostgreSQL server on this machine) or `serve` (the model in a
    `python -m bot.serve` container of the serve image, ENGINE_URL)."""
    from tests.e2e.processes import LAUNCH
    from tests.fake_discord import FakeDiscord

    name = f"chatbot-docker-test-{mode}-{os.getpid()}"
    volume = f"{name}-data"
    names = [name]
    env = {
        "USER_COOLDOWN_SECONDS": "0",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "METRICS_PORT": str(free_port()),
        "METRICS_HOST": "127.0.0.1",
    }
    model = {"MODEL_NAME": "/model", "DEVICE": "cpu", "PRECISION": "fp32"}
    with contextlib.ExitStack() as stack:
        if mode == "postgres":
            from tests.postgres import running_server

            server = stack.enter_context(running_server())
            env["HISTORY_DB"] = server.url(server.create_database())
            say(f"PostgreSQL {server.bin.parent.name} on 127.0.0.1:{server.port} for HISTORY_DB")
        async with FakeDiscord() as fake:
            w = fake.world
            env["DISCORD_TOKEN"] = fake.token
            started = time.monotonic()
            try:
                if mode == "serve":
                    port = free_port()
                    serve_env = {**model, "SERVE_HOST": "0.0.0.0", "SERVE_PORT": "8000", "METRICS_PORT": "9100"}
                    serve_env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
                    names.append(f"{name}-server")
                    # Its own network (Ray's ports stay in the container), the API published on loopback.
                    options = ["--shm-size", "1g", "--publish", f"127.0.0.1:{port}:8000"]
                    options += ["--volume", f"{model_dir}:/model:ro"]
                    await start(docker_run_command(names[1], SERVE_IMAGE, serve_env, *options) + SERVE_COMMAND)
                    await wait_log(names[1], "Serving /model at", timeout=240)
                    say(f"the model server {names[1]} serves the tiny model ({time.monotonic() - started:.1f}s)")
                    env["ENGINE_URL"] = f"http://127.0.0.1:{port}"
                else:
                    env.update(model)
                options = ["--network", "host", "--volume", f"{volume}:/app/data"]
                if mode != "serve":
                    options += ["--volume", f"{model_dir}:/model:ro"]
                # The image's entrypoint (tini) and user, with discord.py pointed at the fake as in tests/e2e.
                await start(
                    docker_run_command(name, IMAGE, env, *options)
                    + ["python", "-c", LAUNCH, fake.base_url, fake.gateway_url]
                )
                say(f"bot container {name} started; waiting for it to log in to the fake Discord at {fake.base_url}")
                try:
                    await fake.wait_ready_session(timeout=180)
                    connected = time.monotonic()
                    say(f"connected to the gateway {connected - started:.1f}s after docker run")
                    reply = await fake.ask(w.member, w.general, "hello there", timeout=90)
                except AssertionError as exc:
                    raise CheckFailed(f"{exc}\n{await logs_of(names)}") from None
                say(f"answered a mention {time.monotonic() - connected:.1f}s after connecting: {reply!r}")
                await check_reply(reply, model_dir, mode)
                for each in names:
                    await wait_healthy(each)
                say("healthy (the image's HEALTHCHECK on /health)")
                for each in names:  # the bot first, then its model server
                    await stop_cleanly(each, fake.token)
                if len(fake.close_codes) != 1 or fake.close_codes[0] not in (1000, 4000):
                    raise CheckFailed(f"gateway close codes {fake.close_codes}, not one clean close")
                await check_history(mode, volume, env)
            finally:
                for each in names:
                    await run("docker", "rm", "--force", "--volumes", each)
                await run("docker", "volume", "rm", "--force", volume)
    say(f"{mode}: PASS")


async def start(command: list[str]) -> None:
    code, _, err = await run(*command)
    if code != 0:
        raise CheckFailed(f"docker run failed ({code}): {err.strip()}")


async def logs_of(names: list[str]) -> str:
    text = ""
    for name in names:
        _, out, err = await run("docker", "logs", name)
        text += f"output of {name}:\n{out}{err}\n"
    return text


async def wait_log(name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, out, err = await run("docker", "logs", name)
        if text in out + err:
            return
        _, running, _ = await run("docker", "inspect", name, "--format", "{{.State.Running}}")
        if running.strip() != "true":
            break
        await asyncio.sleep(1)
    raise CheckFailed(f"{text!r} never appeared in the output of {name}:\n{await logs_of([name])}")


async def check_reply(reply: str, model_dir: Path, mode: str) -> None:
    """A local model must say what the same model says here; through the server, any reply will do (the
    remote engine's prompt carries the speaker's name)."""
    if mode == "serve":
        if not reply.strip():
            raise CheckFailed("an empty reply through the model server")
        return
    from bot.core.types import Turn
    from bot.engine import Engine, EngineConfig

    async with Engine(EngineConfig(model_name=str(model_dir), device="cpu", precision="fp32")) as engine:
        expected = await engine.reply([Turn("user", "hello there")])
    if reply != expected:
        raise CheckFailed(f"the container replied {reply!r}; the same model here says {expected!r}")


async def stop_cleanly(name: str, token: str) -> None:
    stopping = time.monotonic()
    code, _, err = await run("docker", "stop", "--time", "60", name, timeout=90)
    if code != 0:
        raise CheckFailed(f"docker stop failed: {err.strip()}")
    _, state, _ = await run("docker", "inspect", name, "--format", "{{json .State}}")
    exit_code = json.loads(state)["ExitCode"]
    _, out, err = await run("docker", "logs", name)
    logs = out + err
    say(f"docker stop {name} (SIGTERM): exit code {exit_code} after {time.monotonic() - stopping:.1f}s")
    problems = []
    if exit_code != 0:
        problems.append(f"exit code {exit_code}, not 0")
    if "Traceback" in logs:
        problems.append("a traceback in its output")
    if token in logs:
        problems.append("the token in its output")
    if problems:
        raise CheckFailed(f"{name}: " + "; ".join(problems) + f"\ncontainer output:\n{logs}")


async def check_history(mode: str, volume: str, env: dict[str, str]) -> None:
    if mode == "postgres":
        import psycopg

        async with await psycopg.AsyncConnection.connect(env["HISTORY_DB"]) as conn:
            row = await (await conn.execute("SELECT count(*) FROM turns")).fetchone()
        if not row or row[0] < 2:
            raise CheckFailed(f"{row[0] if row else 0} turns in PostgreSQL, not the mention and its reply")
        say(f"history in PostgreSQL: {row[0]} turns")
        return
    code, _, _ = await run("docker", "run", "--rm", "-v", f"{volume}:/app/data", IMAGE, "test", "-s", HISTORY)
    if code != 0:
        raise CheckFailed("no history.sqlite3 in the data volume")
    say("history in the volume: " + HISTORY)


async def wait_healthy(name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        _, status, _ = await run("docker", "inspect", name, "--format", "{{.State.Health.Status}}")
        if status.strip() == "healthy":
            return
        await asyncio.sleep(1)
    _, log, _ = await run("docker", "inspect", name, "--format", "{{json .State.Health}}")
    raise CheckFailed(f"not healthy after {timeout}s ({status.strip()}): {log.strip()}")


# ----- 5. compose.yaml -------------------------------------------------------------------------------


def compose_client() -> list[str] | None:
    if docker("compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def check_compose(workdir: Path) -> None:
    client = compose_client()
    if client is None:
        say("no compose client (docker compose or docker-compose): compose.yaml not checked")
        return
    project = workdir / "compose"
    project.mkdir()
    shutil.copy(REPO / "compose.yaml", project / "compose.yaml")
    shutil.copy(REPO / ".env.example", project / ".env")  # compose reads .env as the bot does
    for profile in PROFILES:
        result = subprocess.run(
            [*client, "--project-directory", str(project), "-f", str(project / "compose.yaml"), "--profile", profile]
            + ["config", "--quiet"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise CheckFailed(f"{' '.join(client)} config --profile {profile} failed:\n{result.stderr.strip()}")
        say(f"compose.yaml, profile {profile}: valid ({' '.join(client)} config)")


# ----- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.docker_check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", action="store_true", help="also: the history in a PostgreSQL server here (needs initdb, pg_ctl)"
    )
    parser.add_argument(
        "--serve", action="store_true", help=f"also: build {SERVE_IMAGE} and run the model in python -m bot.serve"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the logs and the tiny model")
    args = parser.parse_args(argv)
    modes = ["sqlite"] + ["postgres"] * args.postgres + ["serve"] * args.serve
    workdir = Path(tempfile.mkdtemp(prefix="docker-test-"))
    workdir.chmod(0o755)  # the tiny model in it is read by the image's user (uid 10001)
    started = time.monotonic()
    try:
        with docker_daemon(workdir / "dockerd.log"):
            ensure_base_image(workdir)
            for tag in [IMAGE] + [SERVE_IMAGE] * args.serve:
                seconds = build_image(workdir, tag)
                say(f"built {tag} in {seconds:.0f}s: {image_size(tag)}")
            quiet_transformers()
            from tests.tiny_model import build_tiny_model

            model_dir = build_tiny_model(workdir / "tiny-model")
            for path in [model_dir, *model_dir.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            for mode in modes:
                asyncio.run(check_bot(model_dir, mode))
            check_compose(workdir)
    except CheckFailed as exc:
        say(f"FAIL: {exc}")
        say(f"logs kept in {workdir}")
        return 1
    if args.keep_workdir:
        say(f"logs and the tiny model kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"PASS: {', '.join(modes)} ({time.monotonic() - started:.0f}s in all)")
    return 0


def quiet_transformers() -> None:
    """No progress bars here for the tiny model's saving and loading."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
