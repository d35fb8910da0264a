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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
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
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = "discord-chatbot:latest"
BASE_IMAGE = "debian:bookworm-slim"
TORCH_VERSION = "2.13.0"
IMAGE_PYTHON_TAG = "cp311"  # bookworm's python3 is 3.11
PROFILES = ("sqlite", "postgres", "serve")
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


class DirectoryServer:
    """A directory over HTTP on 127.0.0.1 (a thread), for the build's pip to read."""

    def __init__(self, directory: str) -> None:
        handler = functools.partial(Quiet, directory=directory)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


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


def build_image(workdir: Path) -> float:
    settings = pip_settings()
    servers: list[DirectoryServer] = []
    build_args: list[str] = []
    try:
        wheels = torch_wheel_dir(settings)
        if wheels:
            server = DirectoryServer(wheels)
            servers.append(server)
            build_args += ["--build-arg", f"TORCH_FIND_LINKS={server.url}/"]
            say(f"torch {TORCH_VERSION}+cpu from the local wheel directory {wheels} (served at {server.url})")
        else:
            say("no local CPU torch wheel: the build takes torch from https://download.pytorch.org/whl/cpu")
        extra = []
        for url in settings["extra-index-url"]:
            if url.startswith("file://"):  # .../simple, whose pages link to files beside it
                simple = Path(url.removeprefix("file://").rstrip("/"))
                server = DirectoryServer(str(simple.parent))
                servers.append(server)
                extra.append(f"{server.url}/{simple.name}/")
            else:
                extra.append(url)
        if extra:
            build_args += ["--build-arg", "EXTRA_INDEX_URL=" + " ".join(extra)]
        if settings["cert"]:  # a CA bundle pip trusts here (a network that inspects TLS): the build's pip too
            cert = Path(settings["cert"][0])
            server = DirectoryServer(str(cert.parent))
            servers.append(server)
            build_args += ["--build-arg", f"PIP_CERT_URL={server.url}/{cert.name}"]
        if settings["index-url"]:
            build_args += ["--build-arg", f"INDEX_URL={settings['index-url'][0]}"]
        say(f"building {IMAGE} (log: {workdir / 'build.log'})")
        started = time.monotonic()
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx plugin needed
        with (workdir / "build.log").open("w") as log:
            process = subprocess.Popen(
                ["docker", "build", "--network", "host", "-t", IMAGE, *build_args, str(REPO)],
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
            tail = (workdir / "build.log").read_text(errors="replace")[-4000:]
            raise CheckFailed(f"docker build failed ({code}):\n{tail}")
        return time.monotonic() - started
    finally:
        for server in servers:
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


async def check_container(model_dir: Path) -> None:
    from bot.core.types import Turn
    from bot.engine import Engine, EngineConfig
    from tests.e2e.processes import LAUNCH
    from tests.fake_discord import FakeDiscord

    name = f"chatbot-docker-test-{os.getpid()}"
    volume = f"{name}-data"
    metrics_port = free_port()
    async with FakeDiscord() as fake:
        w = fake.world
        env = {
            "DISCORD_TOKEN": fake.token,
            "MODEL_NAME": "/model",
            "DEVICE": "cpu",
            "PRECISION": "fp32",
            "USER_COOLDOWN_SECONDS": "0",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "METRICS_PORT": str(metrics_port),
            "METRICS_HOST": "127.0.0.1",
        }
        command = ["docker", "run", "--detach", "--name", name, "--network", "host"]
        command += ["--volume", f"{model_dir}:/model:ro", "--volume", f"{volume}:/app/data"]
        command += ["--health-interval", "2s", "--health-start-period", "0s"]
        for key, value in env.items():
            command += ["--env", f"{key}={value}"]
        # The image's entrypoint (tini) and user, with discord.py pointed at the fake as in tests/e2e.
        command += [IMAGE, "python", "-c", LAUNCH, fake.base_url, fake.gateway_url]
        started = time.monotonic()
        try:
            code, _, err = await run(*command)
            if code != 0:
                raise CheckFailed(f"docker run failed ({code}): {err.strip()}")
            say(f"container {name} started; waiting for it to log in to the fake Discord at {fake.base_url}")
            try:
                await fake.wait_ready_session(timeout=180)
                connected = time.monotonic()
                say(f"connected to the gateway {connected - started:.1f}s after docker run")
                reply = await fake.ask(w.member, w.general, "hello there", timeout=60)
            except AssertionError as exc:
                _, out, err = await run("docker", "logs", name)
                raise CheckFailed(f"{exc}\ncontainer output:\n{out}{err}") from None
            say(f"answered a mention {time.monotonic() - connected:.1f}s after connecting: {reply!r}")
            async with Engine(EngineConfig(model_name=str(model_dir), device="cpu", precision="fp32")) as engine:
                expected = await engine.reply([Turn("user", "hello there")])
            if reply != expected:
                raise CheckFailed(f"the container replied {reply!r}; the same model here says {expected!r}")
            await wait_healthy(name)
            say("healthy (the image's HEALTHCHECK on /health)")
            stopping = time.monotonic()
            code, _, err = await run("docker", "stop", "--time", "60", name, timeout=90)
            if code != 0:
                raise CheckFailed(f"docker stop failed: {err.strip()}")
            _, state, _ = await run("docker", "inspect", name, "--format", "{{json .State}}")
            exit_code = json.loads(state)["ExitCode"]
            _, out, err = await run("docker", "logs", name)
            logs = out + err
            say(f"docker stop (SIGTERM): exit code {exit_code} after {time.monotonic() - stopping:.1f}s")
            problems = []
            if exit_code != 0:
                problems.append(f"exit code {exit_code}, not 0")
            if "Traceback" in logs:
                problems.append("a traceback in its output")
            if fake.token in logs:
                problems.append("the token in its output")
            if len(fake.close_codes) != 1 or fake.close_codes[0] not in (1000, 4000):
                problems.append(f"gateway close codes {fake.close_codes}, not one clean close")
            code, _, _ = await run("docker", "run", "--rm", "-v", f"{volume}:/app/data", IMAGE, "test", "-s", HISTORY)
            if code != 0:
                problems.append("no history.sqlite3 in the data volume")
            if problems:
                raise CheckFailed("the container " + "; ".join(problems) + f"\ncontainer output:\n{logs}")
            say("stopped cleanly: exit 0, no traceback, gateway closed, token never logged, history in the volume")
        finally:
            await run("docker", "rm", "--force", name)
            await run("docker", "volume", "rm", "--force", volume)


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
    parser.add_argument("--keep-workdir", action="store_true", help="keep the logs and the tiny model")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="docker-test-"))
    started = time.monotonic()
    try:
        with docker_daemon(workdir / "dockerd.log"):
            ensure_base_image(workdir)
            seconds = build_image(workdir)
            say(f"built {IMAGE} in {seconds:.0f}s: {image_size(IMAGE)}")
            from tests.tiny_model import build_tiny_model

            model_dir = build_tiny_model(workdir / "tiny-model")
            for path in [workdir, *model_dir.rglob("*")]:  # readable by the image's user (uid 10001)
                path.chmod(0o755 if path.is_dir() else 0o644)
            model_dir.chmod(0o755)
            asyncio.run(check_container(model_dir))
            check_compose(workdir)
    except CheckFailed as exc:
        say(f"FAIL: {exc}")
        say(f"logs kept in {workdir}")
        return 1
    if args.keep_workdir:
        say(f"logs and the tiny model kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"PASS ({time.monotonic() - started:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
