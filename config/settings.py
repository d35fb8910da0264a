"""Settings: the only place that reads the environment or `.env`.

Every value is parsed and validated here; a bad value raises `SettingsError` with one line that
names the key, so the entrypoint can print it and exit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The system message a chat model (one with a chat template) gets; BlenderBot has none and ignores it.
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly assistant chatting in a Discord server. Several people may talk to you in the same "
    "conversation; each of their messages starts with the speaker's name and a colon. Answer the latest message "
    "concisely, without a name in front of your reply. Never ping anyone and never write @everyone or @here."
)
# SYSTEM_PROMPT set to this word (any case) means no system message at all. An empty value cannot
# say that: empty means "the default" for every key, as in .env.example.
NO_SYSTEM_PROMPT = "none"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message is one line naming the key."""


@dataclass(frozen=True)
class Settings:
    discord_token: str | None
    model_name: str = "facebook/blenderbot-400M-distill"
    device: str = "auto"
    precision: str = "auto"
    history_turns: int = 12
    history_db: Path | str = Path("data/history.sqlite3")  # a Path: an SQLite file; a str: a postgresql:// URL
    dev_guild_id: int | None = None
    log_level: str = "INFO"
    # Generation overrides; None keeps the model's own generation_config value.
    num_beams: int | None = None
    min_new_tokens: int | None = None
    max_new_tokens: int | None = None
    # Engine scheduling.
    max_batch: int = 8
    max_queue: int = 32
    generation_timeout_seconds: float = 60.0
    # Chat behaviour.
    user_cooldown_seconds: float = 3.0
    shutdown_grace_seconds: float = 20.0
    stream_replies: bool = True
    allow_dms: bool = True  # False: DMs get no answer (server admins' settings are per server: /bot)
    # Files, replies and buttons (bot/client/attachments.py, bot/client/reply_buttons.py).
    attachment_max_bytes: int = 100_000  # text files read per message, all together; 0: none are read
    attachment_timeout_seconds: float = 10.0  # the longest one message's files may take to download
    reply_buttons_seconds: float = 900.0  # how long Regenerate stays on a reply; 0: no buttons at all
    # Chat models (decoder-only, with a chat template).
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # "" = no system message
    context_tokens: int | None = None  # None: the model's own limit, capped at 2048
    sampling: bool = True  # False: always greedy, whatever the model's generation_config says
    prefix_cache_mb: int | None = None  # finished conversations' keys/values kept; None: as much as the slabs
    # a new prompt is read in this many tokens per step while replies run; 0: whole; None (auto): as many
    # as keep a step within twice a plain one (bot/engine/step_budget.py)
    prefill_chunk_tokens: int | None = None
    # Shards: None = as many as Discord recommends, all run by this process.
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None  # None: every shard of shard_count (needs shard_count)
    # Prometheus metrics and readiness over HTTP; None = off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # A remote engine (bot/remote/): an OpenAI-compatible server instead of a model in this process.
    engine_url: str | None = None  # e.g. http://127.0.0.1:8000 (without /v1)
    engine_model: str | None = None  # None: the first model the server lists
    engine_api_key: str | None = None
    # The Ray Serve app (bot/serve/).
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_replicas: int = 1


def _int(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(key: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{key} must be a whole number, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise SettingsError(f"{key} must be {bounds}, got {value}")
        return value

    return parse


def _auto_or_int(minimum: int, maximum: int) -> Callable[[str, str], int | None]:
    whole = _int(minimum, maximum)

    def parse(key: str, raw: str) -> int | None:
        if raw.lower() == "auto":
            return None
        try:
            return whole(key, raw)
        except SettingsError:
            raise SettingsError(
                f"{key} must be auto or a whole number between {minimum} and {maximum}, got {raw!r}"
            ) from None

    return parse


def _float(minimum: float) -> Callable[[str, str], float]:
    def parse(key: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{key} must be a number, got {raw!r}") from None
        if not value >= minimum:  # also rejects NaN
            raise SettingsError(f"{key} must be at least {minimum}, got {raw}")
        return value

    return parse


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str, str], str]:
    def parse(key: str, raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise SettingsError(f"{key} must be one of {', '.join(choices)}; got {raw!r}")
        return value

    return parse


def _snowflake(key: str, raw: str) -> int:
    if not raw.isdigit() or not 15 <= len(raw) <= 21:
        raise SettingsError(f"{key} must be a Discord id (a number of 15 to 21 digits), got {raw!r}")
    return int(raw)


def _token(key: str, raw: str) -> str:
    if any(ch.isspace() for ch in raw):
        raise SettingsError(f"{key} must not contain spaces (paste only the token itself)")
    return raw


def _bool(key: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key} must be true or false, got {raw!r}")


# A URL scheme (RFC 3986): `postgresql+psycopg` is one too, and must not be taken for a file name.
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _history_db(key: str, raw: str) -> Path | str:
    """A file path (SQLite), or a `postgresql://` / `postgres://` URL checked for shape here; whether the
    server answers is found out when the bot opens it. Messages never repeat the URL (it may hold a password)."""
    scheme, sep, rest = raw.partition("://")
    if not sep or not _URL_SCHEME.fullmatch(scheme):
        return Path(raw)
    if scheme.lower() not in ("postgresql", "postgres"):
        raise SettingsError(f"{key} must be a file path or a postgresql:// URL, got a {scheme}:// URL")
    raw = scheme.lower() + sep + rest  # libpq takes the scheme in lower case only
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:  # its message can quote part of the password
        raise SettingsError(
            f"{key} is not a valid PostgreSQL URL: its host and port cannot be read; percent-encode characters "
            "such as / ? # @ : in the user name and password"
        ) from None
    if any(ch.isspace() for ch in raw):
        raise SettingsError(f"{key} is not a valid PostgreSQL URL: it contains spaces (percent-encode them as %20)")
    if parts.fragment:
        raise SettingsError(f"{key} is not a valid PostgreSQL URL: it has a #fragment")
    if "/" in parts.path.strip("/"):
        raise SettingsError(f"{key} is not a valid PostgreSQL URL: name one database after the host, as in /dbname")
    return raw


def _shard_ids(key: str, raw: str) -> tuple[int, ...]:
    """`0-3`, `0,2` or `0-1,4`: shard ids, each once, in order."""
    ids: list[int] = []
    for part in raw.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise SettingsError(f"{key} must be shard ids and ranges such as 0-3 or 0,2 or 0-1,4; got {raw!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise SettingsError(f"{key} has a range that runs backwards: {part.strip()!r}")
        for ident in range(first, last + 1):
            if ident in ids:
                raise SettingsError(f"{key} names shard {ident} twice; got {raw!r}")
            ids.append(ident)
    return tuple(sorted(ids))


def _host(key: str, raw: str) -> str:
    if any(ch.isspace() for ch in raw) or "/" in raw:
        raise SettingsError(f"{key} must be a host name or IP address to listen on, such as 127.0.0.1; got {raw!r}")
    return raw


def _text(key: str, raw: str) -> str:
    return raw


def _system_prompt(key: str, raw: str) -> str:
    return "" if raw.lower() == NO_SYSTEM_PROMPT else raw


def _url(key: str, raw: str) -> str:
    parts = urlsplit(raw)
    if "@" in parts.netloc:  # checked first, so no message below repeats a password; the URL is logged
        raise SettingsError(f"{key} must not carry a user name or password; put the key in ENGINE_API_KEY")
    if parts.scheme not in ("http", "https") or not parts.hostname or any(ch.isspace() for ch in raw):
        raise SettingsError(f"{key} must be an http:// or https:// URL such as http://127.0.0.1:8000, got {raw!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError:
        raise SettingsError(f"{key} has an invalid port: {raw!r}") from None
    if parts.query or parts.fragment:
        raise SettingsError(f"{key} must not carry a query or fragment, got {raw!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):  # the client adds /v1 itself
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


# key -> (dataclass field, parser). Empty values count as unset.
_PARSERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "DISCORD_TOKEN": ("discord_token", _token),
    "MODEL_NAME": ("model_name", _text),
    "DEVICE": ("device", _choice(DEVICES)),
    "PRECISION": ("precision", _choice(PRECISIONS)),
    "HISTORY_TURNS": ("history_turns", _int(0, 1000)),
    "HISTORY_DB": ("history_db", _history_db),
    "DEV_GUILD_ID": ("dev_guild_id", _snowflake),
    "LOG_LEVEL": ("log_level", _choice(LOG_LEVELS, upper=True)),
    "NUM_BEAMS": ("num_beams", _int(1, 64)),
    "MIN_NEW_TOKENS": ("min_new_tokens", _int(0, 4096)),
    "MAX_NEW_TOKENS": ("max_new_tokens", _int(1, 4096)),
    "MAX_BATCH": ("max_batch", _int(1, 256)),
    "MAX_QUEUE": ("max_queue", _int(1, 100_000)),
    "GENERATION_TIMEOUT_SECONDS": ("generation_timeout_seconds", _float(0.1)),
    "USER_COOLDOWN_SECONDS": ("user_cooldown_seconds", _float(0.0)),
    "SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", _float(0.0)),
    "STREAM_REPLIES": ("stream_replies", _bool),
    "ALLOW_DMS": ("allow_dms", _bool),
    "ATTACHMENT_MAX_BYTES": ("attachment_max_bytes", _int(0, 8_000_000)),
    "ATTACHMENT_TIMEOUT_SECONDS": ("attachment_timeout_seconds", _float(0.1)),
    "REPLY_BUTTONS_SECONDS": ("reply_buttons_seconds", _float(0.0)),
    "SYSTEM_PROMPT": ("system_prompt", _system_prompt),
    "CONTEXT_TOKENS": ("context_tokens", _int(256, 131072)),
    "SAMPLING": ("sampling", _bool),
    "PREFIX_CACHE_MB": ("prefix_cache_mb", _int(0, 1_000_000)),
    "PREFILL_CHUNK_TOKENS": ("prefill_chunk_tokens", _auto_or_int(0, 131072)),
    "SHARD_COUNT": ("shard_count", _int(1, 100_000)),
    "SHARD_IDS": ("shard_ids", _shard_ids),
    "METRICS_PORT": ("metrics_port", _int(1, 65535)),
    "METRICS_HOST": ("metrics_host", _host),
    "ENGINE_URL": ("engine_url", _url),
    "ENGINE_MODEL": ("engine_model", _text),
    "ENGINE_API_KEY": ("engine_api_key", _token),
    "SERVE_HOST": ("serve_host", _host),
    "SERVE_PORT": ("serve_port", _int(1, 65535)),
    "SERVE_REPLICAS": ("serve_replicas", _int(1, 64)),
}

SETTING_KEYS = tuple(_PARSERS)


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env"
) -> Settings:
    """Read settings from `.env` (if present) overlaid by the process environment.

    The environment wins over `.env`, as python-dotenv's `load_dotenv(override=False)` would.
    """
    values: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ if environ is None else environ)

    fields: dict[str, object] = {}
    for key, (field, parse) in _PARSERS.items():
        raw = values.get(key, "").strip()
        if raw:
            fields[field] = parse(key, raw)
    fields.setdefault("discord_token", None)
    settings = Settings(**fields)  # type: ignore[arg-type]
    if (
        settings.min_new_tokens is not None
        and settings.max_new_tokens is not None
        and settings.min_new_tokens > settings.max_new_tokens
    ):
        raise SettingsError(
            f"MIN_NEW_TOKENS ({settings.min_new_tokens}) must not exceed MAX_NEW_TOKENS ({settings.max_new_tokens})"
        )
    if settings.shard_ids is not None:
        if settings.shard_count is None:
            raise SettingsError("SHARD_IDS needs SHARD_COUNT: the total number of shards across every process")
        too_big = [i for i in settings.shard_ids if i >= settings.shard_count]
        if too_big:
            raise SettingsError(
                f"SHARD_IDS names shard {too_big[0]}, but shard ids run from 0 to {settings.shard_count - 1} "
                f"with SHARD_COUNT={settings.shard_count}"
            )
    return settings
