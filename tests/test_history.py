import sqlite3
from pathlib import Path

import pytest

from bot.history import SCHEMA_VERSION, HistoryStore
from bot.types import Conversation, Turn

A = Conversation(channel_id=1, guild_id=100)
B = Conversation(channel_id=2, guild_id=100)
OTHER_GUILD = Conversation(channel_id=3, guild_id=200)
DM = Conversation(channel_id=4, guild_id=None)


@pytest.fixture
def store(tmp_path: Path) -> HistoryStore:
    s = HistoryStore(tmp_path / "h.sqlite3", max_turns=4)
    yield s
    s.close()


def test_append_and_get_in_order(store: HistoryStore) -> None:
    store.append(A, 7, Turn("user", "hi"), Turn("bot", "hello"))
    assert store.get(A) == [Turn("user", "hi"), Turn("bot", "hello")]
    assert store.get(B) == []


def test_bounded_to_newest_turns(store: HistoryStore) -> None:
    for i in range(5):
        store.append(A, 7, Turn("user", f"q{i}"), Turn("bot", f"a{i}"))
    assert [t.text for t in store.get(A)] == ["q3", "a3", "q4", "a4"]
    assert store.counts() == (1, 4)  # trimmed on disk too


def test_reset_only_touches_one_conversation(store: HistoryStore) -> None:
    store.append(A, 7, Turn("user", "a"), Turn("bot", "b"))
    store.append(B, 7, Turn("user", "c"), Turn("bot", "d"))
    assert store.reset(A) == 2
    assert store.get(A) == [] and len(store.get(B)) == 2


def test_reset_guild_keeps_other_guilds_and_dms(store: HistoryStore) -> None:
    for conv in (A, B, OTHER_GUILD, DM):
        store.append(conv, 7, Turn("user", "x"), Turn("bot", "y"))
    assert store.reset_guild(100) == 4
    assert store.get(A) == store.get(B) == []
    assert len(store.get(OTHER_GUILD)) == 2 and len(store.get(DM)) == 2


def test_forget_user_everywhere(store: HistoryStore) -> None:
    store.append(A, 7, Turn("user", "mine"), Turn("bot", "to me"))
    store.append(A, 8, Turn("user", "theirs"), Turn("bot", "to them"))
    store.append(DM, 7, Turn("user", "dm"), Turn("bot", "dm reply"))
    assert store.forget_user(7) == 4
    assert store.get(A) == [Turn("user", "theirs"), Turn("bot", "to them")]
    assert store.get(DM) == []


def test_survives_reopen_and_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    first = HistoryStore(path, max_turns=10)
    first.append(A, 7, Turn("user", "remember me"), Turn("bot", "I will"))
    first.reset(B)
    first.close()
    second = HistoryStore(path, max_turns=10)
    assert [t.text for t in second.get(A)] == ["remember me", "I will"]
    second.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer version"):
        HistoryStore(path, max_turns=4)


def test_odd_text_stored_verbatim(store: HistoryStore) -> None:
    text = "zalgo z̷̢̛a̶l̸g̵o، עברית \u202e 🙂 '; DROP TABLE turns; --"
    store.append(DM, 7, Turn("user", text), Turn("bot", "ok"))
    assert store.get(DM)[0].text == text


WRITER = """
import sys
from bot.history import HistoryStore
from bot.types import Conversation, Turn
store = HistoryStore(sys.argv[1], max_turns=100000)
i = 0
while True:
    store.append(Conversation(i % 3, 100), 7, Turn("user", f"q{i}"), Turn("bot", f"a{i}"))
    print(i, flush=True)  # acknowledged: the bot would post the reply only now
    i += 1
"""


def test_kill_9_loses_no_acknowledged_turn(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    path = tmp_path / "h.sqlite3"
    root = Path(__file__).resolve().parent.parent
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert writer.stdout is not None
    acknowledged = -1
    for line in writer.stdout:
        acknowledged = int(line)
        if acknowledged >= 200:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store = HistoryStore(path, max_turns=100000)
    texts = {t.text for c in range(3) for t in store.get(Conversation(c, 100))}
    store.close()
    assert all(f"q{i}" in texts and f"a{i}" in texts for i in range(acknowledged + 1))


def test_speaker_round_trip(store: HistoryStore) -> None:
    store.append(A, 7, Turn("user", "hi all", "Alice"), Turn("bot", "hello Alice"))
    store.append(DM, 8, Turn("user", "just us"), Turn("bot", "sure"))
    assert store.get(A) == [Turn("user", "hi all", "Alice"), Turn("bot", "hello Alice")]
    assert store.get(DM) == [Turn("user", "just us"), Turn("bot", "sure")]
    assert store.get(A)[0].speaker == "Alice" and store.get(DM)[0].speaker is None


# The schema as version 1 of the bot wrote it, before `speaker`.
SCHEMA_V1 = """
CREATE TABLE turns (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id   INTEGER NOT NULL,
    guild_id     INTEGER,
    user_id      INTEGER,
    role         TEXT NOT NULL CHECK (role IN ('user', 'bot')),
    text         TEXT NOT NULL,
    created_at   REAL NOT NULL
);
CREATE INDEX turns_by_channel ON turns (channel_id, id);
CREATE INDEX turns_by_guild ON turns (guild_id);
CREATE INDEX turns_by_user ON turns (user_id);
PRAGMA user_version=1;
"""


def test_version_1_file_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V1)
    db.executemany(
        "INSERT INTO turns (channel_id, guild_id, user_id, role, text, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        [(1, 100, 7, "user", "old question", 1.0), (1, 100, 7, "bot", "old answer", 1.0)],
    )
    db.commit()
    db.close()

    store = HistoryStore(path, max_turns=10)
    assert store.get(A) == [Turn("user", "old question"), Turn("bot", "old answer")]  # kept, with no speaker
    store.append(A, 8, Turn("user", "new question", "Bob"), Turn("bot", "new answer"))
    assert store.get(A)[-2:] == [Turn("user", "new question", "Bob"), Turn("bot", "new answer")]
    assert store.forget_user(7) == 2  # the old columns still work
    store.close()

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert "speaker" in [row[1] for row in db.execute("PRAGMA table_info(turns)")]
    db.close()
    reopened = HistoryStore(path, max_turns=10)  # a migrated file opens as it is
    assert reopened.get(A) == [Turn("user", "new question", "Bob"), Turn("bot", "new answer")]
    reopened.close()


def test_new_file_has_the_current_schema(tmp_path: Path) -> None:
    HistoryStore(tmp_path / "h.sqlite3", max_turns=4).close()
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [row[1] for row in db.execute("PRAGMA table_info(turns)")][-1] == "speaker"
    db.close()
