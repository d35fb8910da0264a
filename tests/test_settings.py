from pathlib import Path

import pytest

from config.settings import DEFAULT_SYSTEM_PROMPT, SETTING_KEYS, Settings, SettingsError, load_settings


def test_defaults_without_environment() -> None:
    s = load_settings({}, env_file=None)
    assert s == Settings(discord_token=None)
    assert s.model_name == "facebook/blenderbot-400M-distill"
    assert s.device == "auto" and s.precision == "auto"


def test_every_key_parsed() -> None:
    s = load_settings(
        {
            "DISCORD_TOKEN": "abc.def.ghi",
            "MODEL_NAME": "/models/tiny",
            "DEVICE": "CPU",
            "PRECISION": "int8",
            "HISTORY_TURNS": "4",
            "HISTORY_DB": "/tmp/h.db",
            "DEV_GUILD_ID": "123456789012345678",
            "LOG_LEVEL": "debug",
            "NUM_BEAMS": "3",
            "MIN_NEW_TOKENS": "5",
            "MAX_NEW_TOKENS": "9",
            "MAX_BATCH": "4",
            "MAX_QUEUE": "7",
            "GENERATION_TIMEOUT_SECONDS": "2.5",
            "USER_COOLDOWN_SECONDS": "0",
            "SHUTDOWN_GRACE_SECONDS": "1",
            "STREAM_REPLIES": "off",
            "ALLOW_DMS": "false",
            "SYSTEM_PROMPT": "You are a pirate.",
            "CONTEXT_TOKENS": "4096",
            "SAMPLING": "no",
        },
        env_file=None,
    )
    assert s.discord_token == "abc.def.ghi"
    assert s.device == "cpu" and s.log_level == "DEBUG"
    assert s.history_turns == 4 and s.history_db == Path("/tmp/h.db")
    assert s.dev_guild_id == 123456789012345678
    assert (s.num_beams, s.min_new_tokens, s.max_new_tokens) == (3, 5, 9)
    assert (s.max_batch, s.max_queue) == (4, 7)
    assert s.generation_timeout_seconds == 2.5 and s.user_cooldown_seconds == 0.0
    assert s.stream_replies is False and s.allow_dms is False
    assert (s.system_prompt, s.context_tokens, s.sampling) == ("You are a pirate.", 4096, False)


def test_empty_values_mean_default() -> None:
    assert load_settings({"DEV_GUILD_ID": "", "NUM_BEAMS": "  "}, env_file=None) == Settings(discord_token=None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("HISTORY_TURNS", "many"),
        ("HISTORY_TURNS", "-1"),
        ("DEVICE", "tpu"),
        ("PRECISION", "int4"),
        ("DEV_GUILD_ID", "my-server"),
        ("LOG_LEVEL", "loud"),
        ("MAX_BATCH", "0"),
        ("GENERATION_TIMEOUT_SECONDS", "nan"),
        ("DISCORD_TOKEN", "two words"),
        ("CONTEXT_TOKENS", "255"),
        ("CONTEXT_TOKENS", "131073"),
        ("CONTEXT_TOKENS", "2k"),
        ("SAMPLING", "sometimes"),
        ("ALLOW_DMS", "maybe"),
        ("HISTORY_DB", "postgresql://bot:hunter2@db:port/chat"),
        ("HISTORY_DB", "postgresql://bot:hunter2?x@db/chat"),  # the ? ends the host: "hunter2" reads as its port
        ("HISTORY_DB", "postgresql+psycopg://bot:hunter2@db/chat"),
        ("ENGINE_URL", "http://bot:hunter2@models.example:8000"),
        ("HISTORY_DB", "postgresql://bot:hunter2@db:99999/chat"),
        ("HISTORY_DB", "postgres://bot:hunter2@[::1/chat"),
        ("HISTORY_DB", "postgresql://bot:hunter2@db/chat/extra"),
        ("HISTORY_DB", "mysql://bot:hunter2@db/chat"),
        ("SHARD_COUNT", "0"),
        ("SHARD_COUNT", "two"),
        ("SHARD_IDS", "0-3"),  # without SHARD_COUNT
        ("METRICS_PORT", "0"),
        ("METRICS_PORT", "65536"),
        ("METRICS_PORT", "http"),
        ("METRICS_HOST", "local host"),
        ("ENGINE_URL", "127.0.0.1:8000"),
        ("ENGINE_URL", "ftp://models.example"),
        ("ENGINE_URL", "http://"),
        ("ENGINE_URL", "http://host:99999"),
        ("ENGINE_URL", "http://host:8000/?key=1"),
        ("ENGINE_API_KEY", "two words"),
        ("SERVE_PORT", "0"),
        ("SERVE_PORT", "65536"),
        ("SERVE_REPLICAS", "0"),
        ("PREFILL_CHUNK_TOKENS", "some"),
        ("PREFILL_CHUNK_TOKENS", "-1"),
    ],
)
def test_bad_value_names_the_key_in_one_line(key: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({key: value}, env_file=None)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message
    assert "hunter2" not in message  # a database password is never repeated


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("data/h.sqlite3", Path("data/h.sqlite3")),
        ("/var/lib/bot/history.sqlite3", Path("/var/lib/bot/history.sqlite3")),
        ("postgresql://bot:pw@db.example:5432/chat", "postgresql://bot:pw@db.example:5432/chat"),
        ("postgres://db/chat?sslmode=require", "postgres://db/chat?sslmode=require"),
        ("postgresql:///chat?host=/run/postgresql", "postgresql:///chat?host=/run/postgresql"),
        ("PostgreSQL://db/chat", "postgresql://db/chat"),
    ],
)
def test_history_db_is_a_path_or_a_postgresql_url(raw: str, parsed: Path | str) -> None:
    assert load_settings({"HISTORY_DB": raw}, env_file=None).history_db == parsed


def test_min_above_max_new_tokens_rejected() -> None:
    with pytest.raises(SettingsError, match="MIN_NEW_TOKENS"):
        load_settings({"MIN_NEW_TOKENS": "10", "MAX_NEW_TOKENS": "5"}, env_file=None)


def test_env_file_read_and_environment_wins(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("DISCORD_TOKEN=from-file\nHISTORY_TURNS=3\n# a comment\n")
    s = load_settings({"HISTORY_TURNS": "5"}, env_file=env)
    assert s.discord_token == "from-file" and s.history_turns == 5


def test_env_example_documents_every_key() -> None:
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    documented = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")}
    assert documented == set(SETTING_KEYS)


@pytest.mark.parametrize(("raw", "parsed"), [("", None), ("auto", None), ("AUTO", None), ("0", 0), ("16", 16)])
def test_prefill_chunk_tokens_is_auto_or_a_count(raw: str, parsed: int | None) -> None:
    assert load_settings({"PREFILL_CHUNK_TOKENS": raw}, env_file=None).prefill_chunk_tokens == parsed


def test_chat_model_defaults() -> None:
    s = load_settings({}, env_file=None)
    assert s.system_prompt == DEFAULT_SYSTEM_PROMPT and s.context_tokens is None and s.sampling is True
    assert "Discord" in s.system_prompt and "@everyone" in s.system_prompt
    assert load_settings({"CONTEXT_TOKENS": "256"}, env_file=None).context_tokens == 256
    assert load_settings({"CONTEXT_TOKENS": "131072"}, env_file=None).context_tokens == 131072


@pytest.mark.parametrize("raw", ["none", "None", "NONE", "  none  "])
def test_system_prompt_none_means_no_system_message(raw: str) -> None:
    assert load_settings({"SYSTEM_PROMPT": raw}, env_file=None).system_prompt == ""


@pytest.mark.parametrize("raw", ["", "   "])
def test_empty_system_prompt_keeps_the_default(raw: str) -> None:
    assert load_settings({"SYSTEM_PROMPT": raw}, env_file=None).system_prompt == DEFAULT_SYSTEM_PROMPT


def test_system_prompt_from_env_file_verbatim(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text('SYSTEM_PROMPT="You are Bob.\\nAnswer in French, # not a comment."\n')
    assert load_settings({}, env_file=env).system_prompt == "You are Bob.\nAnswer in French, # not a comment."
    env.write_text("SYSTEM_PROMPT=none\n")
    assert load_settings({}, env_file=env).system_prompt == ""


@pytest.mark.parametrize(
    ("raw", "ids"),
    [("0-3", (0, 1, 2, 3)), ("0,2", (0, 2)), ("0-1,4", (0, 1, 4)), (" 3 , 1 ", (1, 3)), ("5", (5,))],
)
def test_shard_ids_ranges_and_lists(raw: str, ids: tuple[int, ...]) -> None:
    s = load_settings({"SHARD_COUNT": "8", "SHARD_IDS": raw}, env_file=None)
    assert (s.shard_count, s.shard_ids) == (8, ids)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("0-4", "shard 4, but shard ids run from 0 to 3"),
        ("7", "shard 7"),
        ("3-1", "backwards"),
        ("0,0", "twice"),
        ("0-1,1", "twice"),
        ("a-b", "0-1,4"),
        ("1;2", "0-1,4"),
        ("-1", "0-1,4"),
    ],
)
def test_bad_shard_ids_are_one_line_naming_the_key(raw: str, words: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({"SHARD_COUNT": "4", "SHARD_IDS": raw}, env_file=None)
    message = str(err.value)
    assert message.startswith("SHARD_IDS") and "\n" not in message and words in message


def test_shard_and_metrics_defaults() -> None:
    s = load_settings({}, env_file=None)
    assert (s.shard_count, s.shard_ids, s.metrics_port, s.metrics_host) == (None, None, None, "127.0.0.1")
    s = load_settings({"SHARD_COUNT": "2", "METRICS_PORT": "9100", "METRICS_HOST": "0.0.0.0"}, env_file=None)
    assert (s.shard_count, s.shard_ids, s.metrics_port, s.metrics_host) == (2, None, 9100, "0.0.0.0")


def test_remote_engine_and_serve_settings() -> None:
    s = load_settings({}, env_file=None)
    assert (s.engine_url, s.engine_model, s.engine_api_key) == (None, None, None)
    assert (s.serve_host, s.serve_port, s.serve_replicas) == ("127.0.0.1", 8000, 1)
    s = load_settings(
        {
            "ENGINE_URL": "https://models.example:8443/llm/v1/",
            "ENGINE_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
            "ENGINE_API_KEY": "sk-123",
            "SERVE_HOST": "0.0.0.0",
            "SERVE_PORT": "9000",
            "SERVE_REPLICAS": "2",
        },
        env_file=None,
    )
    assert s.engine_url == "https://models.example:8443/llm"  # the client adds /v1 itself
    assert (s.engine_model, s.engine_api_key) == ("Qwen/Qwen2.5-0.5B-Instruct", "sk-123")
    assert (s.serve_host, s.serve_port, s.serve_replicas) == ("0.0.0.0", 9000, 2)
    assert load_settings({"ENGINE_URL": "http://127.0.0.1:8000"}, env_file=None).engine_url == "http://127.0.0.1:8000"
