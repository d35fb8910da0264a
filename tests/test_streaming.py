"""StreamingReply's timing and splitting, on a fake clock with a stand-in channel (no Discord, no model)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import discord
import pytest

from bot.client.streaming import CUT_OFF_NOTE, StreamingReply, has_sentence, split_message

INTERVAL = 1.2


async def settle() -> None:
    """Let every task that can run, run (the stand-ins below never really wait)."""
    for _ in range(50):
        await asyncio.sleep(0)


class FakeClock:
    """Virtual time: `sleep` returns once `advance` has moved the clock to its deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        end = self.now + seconds
        await settle()
        while True:
            while self._sleepers and self._sleepers[0][2].done():  # cancelled naps
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > end:
                break
            deadline, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            future.set_result(None)
            await settle()
        self.now = end
        await settle()


@dataclass
class Write:
    kind: str  # "post", "edit" or "typing"
    time: float
    message_id: int = 0
    content: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)


class Posted:
    """A message the bot posted: it can be edited."""

    def __init__(self, channel: Channel, ident: int, content: str) -> None:
        self.channel, self.id, self.content = channel, ident, content

    async def edit(self, *, content: str, **kwargs: Any) -> Posted:
        if self.channel.refuse_edits:
            raise discord.NotFound(type("R", (), {"status": 404, "reason": "Not Found"})(), "Unknown Message")
        self.channel.writes.append(Write("edit", self.channel.clock(), self.id, content, kwargs))
        self.content = content
        return self


class Channel:
    id = 1

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.writes: list[Write] = []
        self.messages: list[Posted] = []
        self.refuse_edits = False

    async def send(self, content: str, **kwargs: Any) -> Posted:
        posted = Posted(self, 100 + len(self.messages), content)
        self.messages.append(posted)
        self.writes.append(Write("post", self.clock(), posted.id, content, kwargs))
        return posted

    def typing(self) -> Any:
        channel = self

        class Typing:
            def __await__(self) -> Any:
                channel.writes.append(Write("typing", channel.clock()))
                return asyncio.sleep(0).__await__()

        return Typing()

    def of(self, kind: str) -> list[Write]:
        return [w for w in self.writes if w.kind == kind]

    def contents(self) -> list[str]:
        return [m.content for m in self.messages]


class UserMessage:
    id = 42

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def to_reference(self, *, fail_if_not_exists: bool = True) -> tuple[str, int, bool]:
        return ("ref", self.id, fail_if_not_exists)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def channel(clock: FakeClock) -> Channel:
    return Channel(clock)


def streaming(channel: Channel, clock: FakeClock, **kwargs: Any) -> StreamingReply:
    return StreamingReply(
        UserMessage(channel),  # type: ignore[arg-type]
        clock=clock,
        sleep=clock.sleep,
        interval=INTERVAL,
        first_after=1.0,
        **kwargs,
    )


async def write_words(stream: StreamingReply, clock: FakeClock, words: list[str], every: float) -> str:
    """Report `words` one at a time, `every` seconds apart, as the chat service would; the whole text."""
    text = ""
    for word in words:
        text = f"{text} {word}".strip()
        stream.update(text)
        await clock.advance(every)
    return text


def assert_quiet_and_spaced(channel: Channel) -> None:
    """Every post and edit pings nobody, and no message is written twice within the interval."""
    last: dict[int, float] = {}
    for write in channel.writes:
        if write.kind == "typing":
            continue
        mentions = write.kwargs["allowed_mentions"]
        assert mentions.to_dict() == discord.AllowedMentions.none().to_dict()
        if write.kind == "post":
            assert write.kwargs["mention_author"] is False
        if write.message_id in last:
            assert write.time - last[write.message_id] >= INTERVAL - 1e-9, channel.writes
        last[write.message_id] = write.time


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello there.", True),
        ("I think so! maybe", True),
        ("what do you mean? I", True),
        ("one line\nand more", True),
        ("Hi.", False),  # one word is not enough to show
        ("Hi. there", False),
        ("Hi\nthere", False),
        ("no sentence end yet", False),
        ("", False),
    ],
)
def test_a_sentence_needs_an_end_after_two_words(text: str, expected: bool) -> None:
    assert has_sentence(text) is expected


async def test_a_short_reply_is_posted_once_without_edits(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    await write_words(stream, clock, ["Hello", "there", "friend"], every=0.2)
    await stream.finish("Hello there friend", ok=True)
    assert [(w.kind, w.content) for w in channel.writes] == [("post", "Hello there friend")]
    assert channel.writes[0].kwargs["reference"] == ("ref", 42, False)
    assert_quiet_and_spaced(channel)


async def test_a_reply_never_streamed_is_posted_like_before(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    await stream.finish("word " * 500, ok=True)  # 2500 characters, no partial text at all
    assert channel.contents() == split_message("word " * 500)
    assert [w.kind for w in channel.writes] == ["post", "post"]
    assert channel.writes[0].kwargs["reference"] is not None and channel.writes[1].kwargs["reference"] is None


async def test_first_words_go_up_at_the_first_sentence(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    await write_words(stream, clock, ["Hello", "there."], every=0.1)
    assert [(w.kind, w.time, w.content) for w in channel.writes] == [("post", 0.1, "Hello there."), ("typing", 0.1, "")]
    await write_words(stream, clock, ["How", "are", "you?"], every=0.1)
    assert len(channel.of("post")) == 1 and channel.of("edit") == []  # the interval has not passed


async def test_without_a_sentence_first_words_go_up_after_a_second(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    stream.update("one")
    await clock.advance(0.5)
    stream.update("one two")
    await clock.advance(0.25)
    assert channel.writes == []
    await clock.advance(0.25)
    assert [(w.kind, w.time, w.content) for w in channel.of("post")] == [("post", 1.0, "one two")]
    finished = asyncio.ensure_future(stream.finish("one two three", ok=True))
    await clock.advance(INTERVAL)
    await finished
    assert channel.contents() == ["one two three"]
    assert channel.of("edit")[-1].time == pytest.approx(2.2)  # the final edit waited out the interval


async def test_edits_come_at_most_once_per_interval_with_the_newest_text(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    words = ["First", "sentence", "here."] + [f"w{i}" for i in range(37)]
    every = 0.125  # a word every 0.125 s, for 5 s; the sentence is complete at 0.25 s
    text = await write_words(stream, clock, words, every=every)
    assert [(w.kind, w.time) for w in channel.writes[:2]] == [("post", 0.25), ("typing", 0.25)]
    edits = channel.of("edit")
    assert [e.time for e in edits] == pytest.approx([1.45, 2.65, 3.85])
    for edit in edits:  # each showed the newest text when it was sent: nothing queued, nothing stale
        assert edit.content == " ".join(words[: int(edit.time // every) + 1])
    assert_quiet_and_spaced(channel)
    finished = asyncio.ensure_future(stream.finish(text, ok=True))
    await clock.advance(0.025)
    assert not finished.done()  # the final edit waits for the interval since the last one
    await clock.advance(0.05)
    assert finished.done()
    assert channel.of("edit")[-1].time == pytest.approx(5.05)
    assert channel.contents() == [text]
    assert_quiet_and_spaced(channel)


async def test_typing_is_shown_again_after_each_post_until_the_end(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock, limit=40)
    text = await write_words(stream, clock, ["Hi", "there."] + ["abcdefgh"] * 12, every=0.3)
    written = list(channel.writes)
    finished = asyncio.ensure_future(stream.finish(text, ok=True))
    await clock.advance(5)
    await finished
    posts = [i for i, w in enumerate(written) if w.kind == "post"]
    assert len(posts) >= 2
    for i in posts:  # a post hides the indicator; while the reply goes on, it goes up again at once
        assert channel.writes[i + 1].kind == "typing"
        assert channel.writes[i + 1].time == channel.writes[i].time
    assert channel.contents() == split_message(text, 40)


async def test_past_the_limit_a_message_is_finished_and_the_text_goes_on_in_a_new_one(
    channel: Channel, clock: FakeClock
) -> None:
    stream = streaming(channel, clock, limit=50)
    words = ["Once", "upon", "a", "time."] + [f"word{i}" for i in range(40)]
    text = await write_words(stream, clock, words, every=0.1)
    finished = asyncio.ensure_future(stream.finish(text, ok=True))
    await clock.advance(2 * INTERVAL)
    await finished
    assert channel.contents() == split_message(text, 50)
    assert len(channel.messages) >= 5
    assert all(0 < len(m.content) <= 50 for m in channel.messages)
    posts = channel.of("post")
    assert posts[0].kwargs["reference"] == ("ref", 42, False)
    assert all(p.kwargs["reference"] is None for p in posts[1:])  # only the first message is a reply
    assert_quiet_and_spaced(channel)
    # A message is finished with its piece before the next one is posted.
    for earlier, later in itertools.pairwise(channel.messages):
        last_write = max(w.time for w in channel.writes if w.message_id == earlier.id and w.kind != "typing")
        first_write = min(w.time for w in channel.writes if w.message_id == later.id)
        assert last_write <= first_write


async def test_a_failure_mid_reply_says_the_answer_was_cut_off(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    text = await write_words(stream, clock, ["Well,", "let", "me", "think.", "The", "answer"], every=0.1)
    finished = asyncio.ensure_future(stream.finish("Sorry, something went wrong.", ok=False))
    await clock.advance(INTERVAL)
    await finished
    assert channel.contents() == [text + CUT_OFF_NOTE]  # no separate notice
    assert len(channel.of("post")) == 1
    assert_quiet_and_spaced(channel)


async def test_a_cut_off_note_that_does_not_fit_goes_in_a_message_of_its_own(
    channel: Channel, clock: FakeClock
) -> None:
    stream = streaming(channel, clock, limit=60)
    text = "A sentence. " + "x" * 40
    stream.update(text)
    await clock.advance(0.1)
    finished = asyncio.ensure_future(stream.finish("timed out", ok=False))
    await clock.advance(INTERVAL)
    await finished
    assert channel.contents() == [text, CUT_OFF_NOTE.strip()]


async def test_a_failure_before_anything_was_posted_is_just_the_notice(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    stream.update("half a")
    await clock.advance(0.5)
    await stream.finish("Sorry, that took me too long.", ok=False)
    assert channel.contents() == ["Sorry, that took me too long."]
    assert [w.kind for w in channel.writes] == ["post"]


async def test_nothing_is_posted_before_the_previous_reply_is(channel: Channel, clock: FakeClock) -> None:
    previous: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stream = streaming(channel, clock, after=previous)
    text = await write_words(stream, clock, ["Hello", "there.", "More", "words"], every=0.5)
    assert channel.writes == []
    previous.set_result(None)
    await settle()
    assert channel.contents() == [text]  # the newest text, at once
    finished = asyncio.ensure_future(stream.finish(text + " done", ok=True))
    await clock.advance(INTERVAL)
    await finished
    assert channel.contents() == [text + " done"]


async def test_a_refused_edit_is_logged_and_ends_the_stream(
    channel: Channel, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    stream = streaming(channel, clock)
    text = await write_words(stream, clock, ["Hello", "there."], every=0.1)
    channel.refuse_edits = True  # say a moderator deleted the message
    finished = asyncio.ensure_future(stream.finish(text + " And more.", ok=True))
    await clock.advance(INTERVAL)
    await finished
    assert "could not post" in caplog.text
    assert channel.contents() == [text]


async def test_cancel_stops_the_writer(channel: Channel, clock: FakeClock) -> None:
    stream = streaming(channel, clock)
    stream.update("Hello there.")
    await settle()
    writer = stream._writer
    assert writer is not None and not writer.done()  # waiting for more text
    stream.cancel()
    await settle()
    assert writer.cancelled()
