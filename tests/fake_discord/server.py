"""A fake Discord on loopback: the REST API under /api/v10 and a gateway websocket, both aiohttp.

The real, unmodified discord.py client logs in to it. Point `discord.http.Route.BASE` at
`FakeDiscord.api_base` and `discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY` at
`FakeDiscord.gateway_url` (discord.py's plain `Client` connects to its default gateway without asking
`GET /gateway/bot`; the sharded client asks, and the fake answers that too).

Shards work as on Discord: `GET /gateway/bot` recommends `recommended_shards`, each IDENTIFY's
`shard: [id, count]` (default `[0, 1]`) is a session of its own, a guild's events go only to the session
of shard `(guild_id >> 22) % count`, and DMs only to shard 0. An invalid shard is closed with 4010, and
fewer shards than `required_shards` with 4011 (sharding required).

Tests play the users: `send()` pushes MESSAGE_CREATE, `slash()` pushes INTERACTION_CREATE, and the
`wait_*` helpers wait (with timeouts, never fixed sleeps) for what the bot does over REST. Every REST
call is recorded with its method, path, JSON body, time and the status the fake answered.

It is strict where Discord is: empty or over-long messages, unknown channels, missing permissions,
bad message references, late or repeated interaction responses, invalid command payloads and bad
tokens get Discord's status codes and error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

from tests.fake_discord.world import (
    ADMINISTRATOR,
    INTENT_MESSAGE_CONTENT,
    MENTION_EVERYONE,
    VIEW_CHANNEL,
    Channel,
    User,
    World,
    iso,
    shard_of,
)

log = logging.getLogger("fake_discord")

API_PREFIX = "/api/v10"
MESSAGE_LIMIT = 2000
NITRO_MESSAGE_LIMIT = 4000  # what a Nitro subscriber may post (bots stay at 2000)
EPHEMERAL = 1 << 6
TYPING_SHOWN_S = 10.0  # how long one typing request shows the indicator
INTERACTION_DEADLINE_S = 3.0  # Discord forgets an interaction not answered within 3 seconds
_COMMAND_NAME = re.compile(r"^[-_a-z0-9]{1,32}$")

T = TypeVar("T")


class DiscordError(Exception):
    """An error answer: HTTP status plus Discord's `{"code", "message", "errors"}` body."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message, "code": code}
        if errors is not None:
            self.body["errors"] = errors


def _form_error(path: str, code: str, message: str) -> DiscordError:
    """Discord's 400 `Invalid Form Body` (50035) with the nested `_errors` shape."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        errors = {part: errors}
    return DiscordError(400, 50035, "Invalid Form Body", errors)


def _json(data: Any, status: int = 200) -> web.Response:
    """JSON the way Discord sends it: `Content-Type: application/json` exactly (discord.py compares it)."""
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


class CommandNotAvailable(AssertionError):
    """The test asked a user to run a slash command Discord would not show them."""


@dataclass
class RestCall:
    method: str
    path: str  # relative to /api/v10
    query: dict[str, str]
    json: Any
    time: float
    authorization: str | None
    status: int = 0
    response: Any = None


_CALL = web.RequestKey("call", RestCall)  # the request's RestCall, for handlers to stamp records with its time


@dataclass
class Heartbeat:
    time: float
    connection: int
    sequence: int | None


@dataclass
class Interaction:
    id: int
    token: str
    name: str
    user: User
    channel: Channel
    payload: dict[str, Any]
    created: float
    responses: list[dict[str, Any]] = field(default_factory=list)
    response_times: list[float] = field(default_factory=list)
    followups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def response(self) -> dict[str, Any] | None:
        return self.responses[0] if self.responses else None


class _Connection:
    def __init__(self, ident: int, ws: web.WebSocketResponse, path: str, compress: bool) -> None:
        self.id = ident
        self.ws = ws
        self.path = path
        self.compressor = zlib.compressobj() if compress else None
        self.lock = asyncio.Lock()
        self.session: _Session | None = None

    async def send(self, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, separators=(",", ":"))
        if self.compressor is not None:  # zlib-stream: one shared context, each message sync-flushed
            data = self.compressor.compress(text.encode()) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(text)


class _Session:
    def __init__(self, session_id: str, intents: int, shard: tuple[int, int] = (0, 1)) -> None:
        self.id = session_id
        self.intents = intents
        self.shard = shard  # (shard id, shard count)
        self.seq = 0
        self.log: list[tuple[int, str, dict[str, Any]]] = []
        self.conn: _Connection | None = None
        self.lock = asyncio.Lock()
        self.invalid = False


class FakeDiscord:
    def __init__(
        self,
        *,
        token: str = "fake-token",
        heartbeat_interval_ms: int = 41250,
        privileged_intents: bool = True,
        recommended_shards: int = 1,
        required_shards: int = 1,
    ) -> None:
        self.world = World()
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.privileged_intents = privileged_intents
        self.recommended_shards = recommended_shards  # what GET /gateway/bot answers
        self.required_shards = required_shards  # an IDENTIFY with fewer shards is closed with 4011

        self.calls: list[RestCall] = []
        self.heartbeats: list[Heartbeat] = []
        self.gateway_log: list[tuple[float, str, Any]] = []  # (time, "recv op N" / "send EVENT", data)
        self.identifies = 0
        self.resumes = 0
        self.close_codes: list[int | None] = []  # how each gateway socket ended
        self.refusals: list[int] = []  # close codes the fake sent (4004 bad token, 4014 intents, ...)
        self.replayed: list[tuple[int, str]] = []  # (seq, event) sent again after a RESUME
        # ((shard id, count), event, guild id or None for a DM) for each event sent to a session
        self.deliveries: list[tuple[tuple[int, int], str, int | None]] = []
        self.connection_paths: list[str] = []  # "/gateway" for IDENTIFY, "/resume" for resume_gateway_url
        self.commands: dict[tuple[int | None, str], dict[str, Any]] = {}
        self.interactions: dict[int, Interaction] = {}
        self.bot_messages: list[dict[str, Any]] = []  # every message the bot created, in order, as it is now
        self.bot_edits: list[dict[str, Any]] = []  # every edit of one: message id, content, time, allowed_mentions
        self.typing_delays: list[float] = []  # each typing request takes the next delay (s), if any, to answer

        self._sessions: dict[str, _Session] = {}
        self._session: _Session | None = None  # the bot's newest session
        self._shards: dict[int, _Session] = {}  # shard id -> the newest session that IDENTIFYed as that shard
        self._connections = 0
        self._cond = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self.port = 0

    # ----- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(middlewares=[self._record_middleware], client_max_size=8 * 1024 * 1024)
        r = app.router
        r.add_get("/gateway", self._gateway)
        r.add_get("/resume", self._gateway)
        p = API_PREFIX
        r.add_get(p + "/gateway", self._get_gateway)
        r.add_get(p + "/gateway/bot", self._get_gateway_bot)
        r.add_get(p + "/users/@me", self._get_me)
        r.add_get(p + "/oauth2/applications/@me", self._get_application)
        r.add_get(p + "/applications/{app}/commands", self._get_commands)
        r.add_put(p + "/applications/{app}/commands", self._put_commands)
        r.add_get(p + "/applications/{app}/guilds/{guild}/commands", self._get_commands)
        r.add_put(p + "/applications/{app}/guilds/{guild}/commands", self._put_commands)
        r.add_post(p + "/channels/{channel}/messages", self._post_message)
        r.add_patch(p + "/channels/{channel}/messages/{message}", self._edit_message)
        r.add_post(p + "/channels/{channel}/typing", self._post_typing)
        r.add_get(p + "/channels/{channel}", self._get_channel)
        r.add_post(p + "/interactions/{interaction}/{token}/callback", self._interaction_callback)
        r.add_post(p + "/webhooks/{app}/{token}", self._followup)
        r.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"fake discord stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def resume_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/resume"

    # ----- waiting -----------------------------------------------------------------------------

    async def _changed(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate: Callable[[], T], *, timeout: float = 15.0, what: str = "a condition") -> T:
        """Wait until `predicate()` is truthy (checked after every REST call and gateway event)."""
        async with self._cond:
            try:
                return await asyncio.wait_for(self._cond.wait_for(predicate), timeout)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None

    async def wait_ready_session(self, timeout: float = 15.0) -> None:
        await self.wait_for(
            lambda: self._session is not None and self._session.conn is not None,
            timeout=timeout,
            what="the bot to IDENTIFY",
        )

    async def wait_reply(self, message: dict[str, Any], *, timeout: float = 15.0) -> dict[str, Any]:
        """The bot's message that replies to (references) the user's `message`."""
        mid = message["id"]

        def find() -> dict[str, Any] | None:
            for m in self.bot_messages:
                ref = m.get("message_reference")
                if ref and ref.get("message_id") == mid and m["type"] == 19:
                    return m
            return None

        found = await self.wait_for(find, timeout=timeout, what=f"a reply to message {mid}")
        assert found is not None
        return found

    async def wait_response(self, interaction: Interaction, *, timeout: float = 15.0) -> dict[str, Any]:
        """What the user is shown: the bot's callback `{"type": 4, "data": {...}}`, or, when the bot
        deferred (type 5, "thinking..."), `{"type": 5, "data": <its first follow-up>}` once that comes."""
        response: dict[str, Any] = await self.wait_for(
            lambda: interaction.response,
            timeout=timeout,  # type: ignore[return-value]
            what=f"a response to /{interaction.name}",
        )
        if response.get("type") != 5:
            return response
        followup = await self.wait_for(
            lambda: interaction.followups[0] if interaction.followups else None,
            timeout=timeout,
            what=f"the follow-up to the deferred /{interaction.name}",
        )
        return {"type": 5, "data": followup}

    # ----- queries -----------------------------------------------------------------------------

    def calls_to(self, method: str, pattern: str) -> list[RestCall]:
        rx = re.compile(pattern)
        return [c for c in self.calls if c.method == method and rx.fullmatch(c.path)]

    def typing_calls(self, channel: Channel) -> list[RestCall]:
        return self.calls_to("POST", f"/channels/{channel.id}/typing")

    def message_posts(self, channel: Channel | None = None) -> list[RestCall]:
        path = f"/channels/{channel.id}/messages" if channel else r"/channels/\d+/messages"
        return self.calls_to("POST", path)

    def messages_by_bot(self, channel: Channel) -> list[dict[str, Any]]:
        """The bot's messages in `channel`, in the order they were posted, each as it reads now (edits applied)."""
        return [m for m in self.bot_messages if m["channel_id"] == str(channel.id) and m["type"] in (0, 19)]

    def message_edits(self, channel: Channel | None = None) -> list[RestCall]:
        path = f"/channels/{channel.id}/messages/\\d+" if channel else r"/channels/\d+/messages/\d+"
        return self.calls_to("PATCH", path)

    def edits_of(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The bot's edits of `message` (one of its own), in order: content, time, allowed_mentions, pings."""
        return [e for e in self.bot_edits if e["id"] == message["id"]]

    def writes_to(self, message: dict[str, Any]) -> list[float]:
        """When the bot posted `message` and each time it edited it (time.monotonic(), as RestCall.time)."""
        return [message["posted_at"]] + [e["time"] for e in self.edits_of(message)]

    def typing_shown(self, channel: Channel, at: float) -> bool:
        """Whether people in `channel` see the bot typing at time `at`, as Discord shows it: a typing request
        lights the indicator for 10 seconds, and a new message from the bot puts it out (an edit does not)."""
        lit = [c.time for c in self.typing_calls(channel) if c.status == 204 and c.time <= at]
        if not lit or at - lit[-1] > TYPING_SHOWN_S:
            return False
        return not any(lit[-1] < c.time <= at for c in self.message_posts(channel) if c.status == 200)

    def failed_calls(self) -> list[RestCall]:
        return [c for c in self.calls if c.status >= 400]

    # ----- the users' side ---------------------------------------------------------------------

    @property
    def session_intents(self) -> int | None:
        return self._session.intents if self._session else None

    @property
    def shard_sessions(self) -> dict[int, tuple[int, int]]:
        """Shard id -> (id, count) of the newest session IDENTIFYed as that shard."""
        return {shard_id: session.shard for shard_id, session in self._shards.items()}

    async def wait_shards(self, *shard_ids: int, timeout: float = 15.0) -> None:
        """Wait until each of `shard_ids` has a connected session."""
        await self.wait_for(
            lambda: all(i in self._shards and self._shards[i].conn is not None for i in shard_ids),
            timeout=timeout,
            what=f"shards {shard_ids} to IDENTIFY",
        )

    async def send(
        self,
        author: User,
        channel: Channel,
        content: str,
        *,
        reply_to: dict[str, Any] | None = None,
        ping_author: bool = True,
        webhook: bool = False,
        attachments: list[dict[str, Any]] | None = None,
        nitro: bool = False,
        message_type: int | None = None,
        store: bool = True,
    ) -> dict[str, Any]:
        """`author` posts `content` in `channel`; the bot receives MESSAGE_CREATE.

        `reply_to` makes it a reply; like Discord's client, a reply mentions (pings) the replied-to
        author unless `ping_author` is False. `nitro` lets the author post up to 4000 characters.
        `message_type` overrides the type (e.g. 7, a member-join system message). `store=False`
        delivers the message but keeps no copy, as if it were deleted at once: a reply to it then
        finds no message to reference.
        """
        limit = NITRO_MESSAGE_LIMIT if nitro else MESSAGE_LIMIT
        assert 0 < len(content) <= limit or attachments, "users can't post empty or over-long messages"
        w = self.world
        reference = None
        if reply_to is not None:
            reference = {"message_id": reply_to["id"], "channel_id": str(channel.id), "fail_if_not_exists": True}
            if channel.guild_id:
                reference["guild_id"] = str(channel.guild_id)
        webhook_id = w.ids.next() if webhook else None
        sender = User(webhook_id, "Captain Hook", bot=True) if webhook_id else author
        kind = message_type if message_type is not None else 19 if reference else 0
        message = w.message_payload(
            channel,
            sender,
            content,
            type=kind,
            reference=reference,
            webhook_id=webhook_id,
            attachments=attachments,
        )
        if reply_to is not None and ping_author:
            replied = self.world.users.get(int(reply_to["author"]["id"]))
            if replied is not None and all(u["id"] != str(replied.id) for u in message["mentions"]):
                mention = replied.payload()
                members = self.world.guild_members(channel.guild_id)
                if replied.id in members:
                    mention["member"] = members[replied.id].payload(with_user=False)
                message["mentions"].append(mention)
        if store:
            channel.messages[int(message["id"])] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def edit(self, message: dict[str, Any], content: str) -> dict[str, Any]:
        """The author edits `message`; the bot receives MESSAGE_UPDATE with the new content."""
        channel = self.world.channels[int(message["channel_id"])]
        users, roles = self.world.mentions_in(content, channel)
        edited = {**message, "content": content, "mentions": users, "mention_roles": roles, "edited_timestamp": iso()}
        if int(message["id"]) in channel.messages:
            channel.messages[int(message["id"])] = edited
        await self.dispatch("MESSAGE_UPDATE", edited)
        return edited

    async def delete(self, message: dict[str, Any]) -> None:
        """The author deletes `message`; the bot receives MESSAGE_DELETE and replies can't reference it."""
        channel = self.world.channels[int(message["channel_id"])]
        channel.messages.pop(int(message["id"]), None)
        data = {"id": message["id"], "channel_id": message["channel_id"]}
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
        await self.dispatch("MESSAGE_DELETE", data)

    def attachment(self, filename: str = "cat.png", size: int = 12345) -> dict[str, Any]:
        """An attachment payload as Discord sends it in MESSAGE_CREATE."""
        aid = self.world.ids.next()
        url = f"{self.base_url}/attachments/{aid}/{filename}"
        return {
            "id": str(aid),
            "filename": filename,
            "size": size,
            "url": url,
            "proxy_url": url,
            "content_type": "image/png",
            "width": 64,
            "height": 64,
        }

    async def mention(self, author: User, channel: Channel, text: str) -> dict[str, Any]:
        """`author` writes `<@bot> text` in `channel` (in a DM, just `text` is more natural)."""
        return await self.send(author, channel, f"{self.world.bot_user.mention} {text}")

    async def ask(self, author: User, channel: Channel, text: str, *, timeout: float = 15.0) -> str:
        """`author` says `text` to the bot (a mention in a server, plain in a DM); the reply's text."""
        if channel.guild_id is not None:
            message = await self.mention(author, channel, text)
        else:
            message = await self.send(author, channel, text)
        return (await self.wait_reply(message, timeout=timeout))["content"]

    async def add_text_channel(self, name: str) -> Channel:
        channel = self.world.add_text_channel(name)
        await self.dispatch("CHANNEL_CREATE", channel.payload())
        return channel

    async def slash(
        self, user: User, channel: Channel, name: str, *, force: bool = False, age: float = 0.0, **options: Any
    ) -> Interaction:
        """`user` runs `/name option:value ...` in `channel`; the bot receives INTERACTION_CREATE.

        Like Discord, the fake refuses (CommandNotAvailable) a command that was never synced, that
        is not allowed in this context, or that `default_member_permissions` hides from this
        user; `force=True` delivers it anyway, as a stale client or a crafted request could.
        `age` makes it that many seconds old on arrival (as one replayed after a RESUME can be).
        """
        w = self.world
        guild_id = channel.guild_id
        command = self.commands.get((guild_id, name)) if guild_id else None
        command = command or self.commands.get((None, name))
        if command is None:
            raise CommandNotAvailable(f"/{name} was never synced")
        context = 0 if guild_id else 1
        contexts = command.get("contexts")
        if not force and contexts is not None and context not in contexts:
            raise CommandNotAvailable(f"/{name} is not allowed in context {context}")
        if not force and guild_id is None and command.get("dm_permission") is False:
            raise CommandNotAvailable(f"/{name} is not allowed in DMs")
        perms = w.permissions_in(user.id, channel)
        required = command.get("default_member_permissions")
        if guild_id and required is not None and not force:
            need = int(required)
            if not (perms & ADMINISTRATOR or ((perms & need) == need and need != 0)):
                raise CommandNotAvailable(f"/{name} is hidden from {user.username} (needs {need})")

        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1}
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        defs = {o["name"]: o for o in command.get("options", [])}
        values = []
        for key, value in options.items():
            if key not in defs:
                raise CommandNotAvailable(f"/{name} has no option {key!r}")
            choices = defs[key].get("choices")
            if choices and value not in [c["value"] for c in choices]:
                raise CommandNotAvailable(f"{value!r} is not a choice of /{name} {key}")
            values.append({"name": key, "type": defs[key]["type"], "value": value})
        missing = [k for k, o in defs.items() if o.get("required") and k not in options]
        if missing:
            raise CommandNotAvailable(f"/{name} needs {missing}")
        if values:
            data["options"] = values

        iid = w.ids.next()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(w.application_id),
            "type": 2,
            "data": data,
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "token": token,
            "version": 1,
            "app_permissions": str(w.permissions_in(w.bot_user.id, channel) if guild_id else perms),
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id) if guild_id else "0"},
            "context": context,
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if guild_id:
            member = w.guild_members(guild_id)[user.id].payload()
            member["permissions"] = str(perms)
            payload.update(
                guild_id=str(guild_id),
                guild_locale="en-US",
                guild={"id": str(guild_id), "locale": "en-US", "features": []},
                member=member,
            )
        else:
            payload["user"] = user.payload()
        record = Interaction(iid, token, name, user, channel, payload, time.monotonic() - age)
        self.interactions[iid] = record
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

    # ----- gateway -----------------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH (op 0) to the session(s) of the shard it belongs to: the guild's shard, or shard 0
        for a DM. Kept in each session's log for RESUME."""
        guild_id = data.get("guild_id")
        sessions = [s for s in self._shards.values() if self._routes_to(s, int(guild_id) if guild_id else None)]
        if not sessions:
            where = f"guild {guild_id}" if guild_id else "a DM"
            raise AssertionError(f"no gateway session for the shard of {where} to dispatch {event} to")
        for session in sessions:
            async with session.lock:
                await self._dispatch_locked(session, event, data)
        await self._changed()

    @staticmethod
    def _routes_to(session: _Session, guild_id: int | None) -> bool:
        """Whether Discord sends an event of `guild_id` (None: a DM) to `session`."""
        shard_id, count = session.shard
        return shard_id == 0 if guild_id is None else shard_of(guild_id, count) == shard_id

    async def _dispatch_locked(self, session: _Session, event: str, data: dict[str, Any] | None) -> None:
        guild = (data or {}).get("id" if event == "GUILD_CREATE" else "guild_id")
        self.deliveries.append((session.shard, event, int(guild) if guild else None))
        session.seq += 1
        session.log.append((session.seq, event, data))  # type: ignore[arg-type]
        if session.conn is not None:
            await self._send_event(session.conn, session, session.seq, event, data)

    async def _send_event(
        self, conn: _Connection, session: _Session, seq: int, event: str, data: dict[str, Any] | None
    ) -> None:
        if event == "MESSAGE_CREATE" and data is not None:
            data = self._redact(session, data)
        self.gateway_log.append((time.monotonic(), f"send {event}", seq))
        try:
            async with conn.lock:
                await conn.send({"op": 0, "t": event, "s": seq, "d": data})
        except (ConnectionResetError, RuntimeError) as exc:  # closed under us; RESUME replays it
            log.debug("could not send %s: %s", event, exc)

    def _redact(self, session: _Session, message: dict[str, Any]) -> dict[str, Any]:
        """Without the Message Content intent, Discord blanks content the bot isn't addressed in."""
        if session.intents & INTENT_MESSAGE_CONTENT:
            return message
        bot_id = str(self.world.bot_user.id)
        if "guild_id" not in message or message["author"]["id"] == bot_id:
            return message
        if any(u["id"] == bot_id for u in message["mentions"]):
            return message
        return {**message, "content": "", "embeds": [], "attachments": [], "components": []}

    async def request_reconnect(self) -> None:
        """Send RECONNECT (op 7): the client should drop the socket and RESUME on resume_gateway_url."""
        session = self._session
        assert session is not None and session.conn is not None, "the bot is not connected"
        conn = session.conn
        self.gateway_log.append((time.monotonic(), "send op 7", None))
        async with conn.lock:
            await conn.send({"op": 7, "d": None})

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        self._sockets.add(ws)
        self._connections += 1
        self.connection_paths.append(request.path)
        q = request.query
        conn = _Connection(self._connections, ws, request.path, q.get("compress") == "zlib-stream")
        try:
            if q.get("v") != "10":
                await self._refuse(ws, 4012, b"Invalid API version.")
                return ws
            if q.get("encoding", "json") != "json":
                await self._refuse(ws, 4002, b"Error while decoding payload.")
                return ws
            async with conn.lock:
                hello = {"heartbeat_interval": self.heartbeat_interval_ms}
                await conn.send({"op": 10, "s": None, "t": None, "d": hello})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        payload = json.loads(msg.data)
                    except ValueError:
                        await self._refuse(ws, 4002, b"Error while decoding payload.")
                        break
                    await self._on_gateway_message(conn, payload)
                elif msg.type in (WSMsgType.BINARY,):
                    await self._refuse(ws, 4002, b"Error while decoding payload.")
                    break
        finally:
            self._sockets.discard(ws)
            self.close_codes.append(ws.close_code)
            session = conn.session
            if session is not None:
                async with session.lock:
                    if session.conn is conn:
                        session.conn = None
                if ws.close_code in (1000, 1001):  # a clean close ends the session; others may RESUME
                    session.invalid = True
            await self._changed()
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, code: int, reason: bytes) -> None:
        """Close the socket with a gateway close code, as Discord does for bad sessions."""
        self.refusals.append(code)
        await ws.close(code=code, message=reason)
        await self._changed()

    async def _on_gateway_message(self, conn: _Connection, payload: dict[str, Any]) -> None:
        op = payload.get("op")
        d = payload.get("d")
        now = time.monotonic()
        self.gateway_log.append((now, f"recv op {op}", d if op != 2 else "<identify>"))
        if op == 1:
            self.heartbeats.append(Heartbeat(now, conn.id, d))
            async with conn.lock:
                await conn.send({"op": 11, "s": None, "t": None, "d": None})
            await self._changed()
            return
        if op == 2:
            await self._identify(conn, d)
        elif op == 6:
            await self._resume(conn, d)
        elif conn.session is None:
            await self._refuse(conn.ws, 4003, b"Not authenticated.")
        elif op in (3, 4, 8):  # presence, voice state, request guild members: accepted, ignored
            pass
        else:
            await self._refuse(conn.ws, 4001, b"Unknown opcode.")
        await self._changed()

    async def _identify(self, conn: _Connection, d: dict[str, Any]) -> None:
        if conn.session is not None:
            await self._refuse(conn.ws, 4005, b"Already authenticated.")
            return
        if not isinstance(d, dict) or d.get("token") != self.token:
            await self._refuse(conn.ws, 4004, b"Authentication failed.")
            return
        intents = d.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents >= 1 << 26:
            await self._refuse(conn.ws, 4013, b"Invalid intent(s).")
            return
        if intents & INTENT_MESSAGE_CONTENT and not self.privileged_intents:
            await self._refuse(conn.ws, 4014, b"Disallowed intent(s).")
            return
        shard = d.get("shard", [0, 1])
        valid = (
            isinstance(shard, list)
            and len(shard) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in shard)
            and 0 <= shard[0] < shard[1]
        )
        if not valid:
            await self._refuse(conn.ws, 4010, b"Invalid shard.")
            return
        if shard[1] < self.required_shards:
            await self._refuse(conn.ws, 4011, b"Sharding required.")
            return
        self.identifies += 1
        w = self.world
        session = _Session(secrets.token_hex(16), intents, (shard[0], shard[1]))
        self._sessions[session.id] = session
        self._session = session
        self._shards[shard[0]] = session
        conn.session = session
        guilds = [g for g in w.guilds if self._routes_to(session, g)]
        async with session.lock:
            session.conn = conn
            ready = {
                "v": 10,
                "user": {**w.bot_user.payload(), "verified": True, "mfa_enabled": False, "email": None},
                "guilds": [{"id": str(g), "unavailable": True} for g in guilds],
                "session_id": session.id,
                "session_type": "normal",
                "resume_gateway_url": self.resume_url,
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": [],
                "user_settings": {},
                "shard": list(session.shard),
                "application": {"id": str(w.application_id), "flags": 1 << 23},
                "_trace": ["fake-discord"],
            }
            await self._dispatch_locked(session, "READY", ready)
            for guild_id in guilds:
                await self._dispatch_locked(session, "GUILD_CREATE", w.guild_payload(guild_id))

    async def _resume(self, conn: _Connection, d: dict[str, Any]) -> None:
        session = self._sessions.get(d.get("session_id", "")) if isinstance(d, dict) else None
        if session is None or session.invalid or d.get("token") != self.token or not isinstance(d.get("seq"), int):
            async with conn.lock:
                await conn.send({"op": 9, "s": None, "t": None, "d": False})
            return
        self.resumes += 1
        conn.session = session
        async with session.lock:
            for seq, event, data in session.log:
                if seq > d["seq"]:
                    self.replayed.append((seq, event))
                    await self._send_event(conn, session, seq, event, data)
            session.conn = conn
            await self._dispatch_locked(session, "RESUMED", {"_trace": ["fake-discord"]})

    # ----- REST --------------------------------------------------------------------------------

    @web.middleware
    async def _record_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
        call = RestCall(
            request.method,
            request.path[len(API_PREFIX) :],
            dict(request.query),
            body,
            time.monotonic(),
            request.headers.get("Authorization"),
        )
        self.calls.append(call)
        request[_CALL] = call  # so a handler can stamp what it records with the request's time
        try:
            needs_auth = not call.path.startswith(("/interactions/", "/webhooks/"))
            if needs_auth and call.authorization != f"Bot {self.token}":
                raise DiscordError(401, 0, "401: Unauthorized")
            response = await handler(request)
        except DiscordError as exc:
            response = _json(exc.body, status=exc.status)
            call.response = exc.body
        else:
            if isinstance(response, web.Response) and response.body is not None and response.status != 204:
                try:
                    call.response = json.loads(response.body)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    call.response = response.body
        call.status = response.status
        await self._changed()
        return response

    async def _unknown(self, request: web.Request) -> web.Response:
        if not request.path.startswith(API_PREFIX):
            return _json({"message": "404: Not Found", "code": 0}, status=404)
        raise DiscordError(404, 0, "404: Not Found")

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": self.recommended_shards,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1},
            }
        )

    async def _get_me(self, request: web.Request) -> web.Response:
        me = self.world.bot_user.payload()
        me.update(verified=True, mfa_enabled=False, email=None, locale="en-US", bio="", banner=None)
        return _json(me)

    async def _get_application(self, request: web.Request) -> web.Response:
        w = self.world
        return _json(
            {
                "id": str(w.application_id),
                "name": w.bot_user.username,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": 1 << 23,  # GATEWAY_MESSAGE_CONTENT_LIMITED
                "hook": True,
                "is_monetized": False,
                "owner": w.owner.payload(),
                "team": None,
                "bot": w.bot_user.payload(),
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "install_params": {"scopes": ["bot", "applications.commands"], "permissions": "274877975552"},
                "integration_types_config": {"0": {}},
                "approximate_guild_count": len(w.guilds),
            }
        )

    def _check_app(self, request: web.Request) -> int | None:
        if request.match_info["app"] != str(self.world.application_id):
            raise DiscordError(403, 50001, "Missing Access")
        guild = request.match_info.get("guild")
        if guild is None:
            return None
        if not guild.isdigit() or int(guild) not in self.world.guilds:
            raise DiscordError(403, 50001, "Missing Access")
        return int(guild)

    async def _get_commands(self, request: web.Request) -> web.Response:
        guild_id = self._check_app(request)
        return _json([c for (g, _), c in self.commands.items() if g == guild_id])

    async def _put_commands(self, request: web.Request) -> web.Response:
        guild_id = self._check_app(request)
        body = await request.json()
        if not isinstance(body, list) or len(body) > 100:
            raise _form_error("_root", "BASE_TYPE_BAD_LENGTH", "Must be between 0 and 100 in length.")
        names: set[str] = set()
        stored: dict[str, dict[str, Any]] = {}
        for index, cmd in enumerate(body):
            self._validate_command(index, cmd)
            if cmd["name"] in names:
                raise _form_error(
                    f"{index}.name",
                    "APPLICATION_COMMANDS_DUPLICATE_NAME",
                    f"Application command names must be unique: {cmd['name']}",
                )
            names.add(cmd["name"])
            old = self.commands.get((guild_id, cmd["name"]))
            record = {
                "id": old["id"] if old else str(self.world.ids.next()),
                "application_id": str(self.world.application_id),
                "version": str(self.world.ids.next()),
                "type": cmd.get("type", 1),
                "name": cmd["name"],
                "description": cmd.get("description", ""),
                "options": cmd.get("options", []),
                "default_member_permissions": None
                if cmd.get("default_member_permissions") is None
                else str(cmd["default_member_permissions"]),
                "dm_permission": cmd.get("dm_permission", True),
                "contexts": cmd.get("contexts"),
                "integration_types": cmd.get("integration_types", [0]),
                "nsfw": cmd.get("nsfw", False),
            }
            if guild_id is not None:
                record["guild_id"] = str(guild_id)
            stored[cmd["name"]] = record
        for key in [k for k in self.commands if k[0] == guild_id]:
            del self.commands[key]
        for name, record in stored.items():
            self.commands[(guild_id, name)] = record
        return _json(list(stored.values()))

    @staticmethod
    def _validate_command(index: int, cmd: Any) -> None:
        if not isinstance(cmd, dict) or not isinstance(cmd.get("name"), str):
            raise _form_error(f"{index}.name", "BASE_TYPE_REQUIRED", "This field is required")
        if not _COMMAND_NAME.match(cmd["name"]):
            raise _form_error(f"{index}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        if cmd.get("type", 1) == 1 and not 1 <= len(cmd.get("description") or "") <= 100:
            raise _form_error(f"{index}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        dmp = cmd.get("default_member_permissions")
        # Discord takes an integer or a string of digits, and always answers with a string.
        whole_number = isinstance(dmp, int) and not isinstance(dmp, bool) and dmp >= 0
        if dmp is not None and not (whole_number or (isinstance(dmp, str) and dmp.isdigit())):
            raise _form_error(f"{index}.default_member_permissions", "NUMBER_TYPE_COERCE", "Value is not int.")
        options = cmd.get("options") or []
        if len(options) > 25:
            raise _form_error(f"{index}.options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        seen_optional = False
        for o_index, option in enumerate(options):
            where = f"{index}.options.{o_index}"
            if not _COMMAND_NAME.match(option.get("name", "")):
                raise _form_error(f"{where}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            if not 1 <= len(option.get("description") or "") <= 100:
                raise _form_error(
                    f"{where}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            if option.get("required"):
                if seen_optional:
                    raise _form_error(
                        where,
                        "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                        "Required options must be placed before non-required options",
                    )
            else:
                seen_optional = True
            if len(option.get("choices") or []) > 25:
                raise _form_error(f"{where}.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")

    def _channel(self, request: web.Request) -> Channel:
        try:
            channel = self.world.channels[int(request.match_info["channel"])]
        except (KeyError, ValueError):
            raise DiscordError(404, 10003, "Unknown Channel") from None
        bot_id = self.world.bot_user.id
        if channel.guild_id is not None and not self.world.permissions_in(bot_id, channel) & VIEW_CHANNEL:
            raise DiscordError(403, 50001, "Missing Access")
        return channel

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json(self._channel(request).payload())

    async def _post_typing(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        if self.typing_delays:
            await asyncio.sleep(self.typing_delays.pop(0))  # a slow answer, as under load
        if not self.world.can_send(self.world.bot_user.id, channel):
            raise DiscordError(403, 50013, "Missing Permissions")
        # Discord's rate-limit headers: once discord.py has seen them it sends several typing
        # requests to one channel at once (without them it sends one at a time).
        return web.Response(
            status=204,
            headers={
                "X-RateLimit-Bucket": "fake-typing",
                "X-RateLimit-Limit": "50",
                "X-RateLimit-Remaining": "49",
                "X-RateLimit-Reset-After": "1.000",
                "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
            },
        )

    @staticmethod
    def _validate_content(body: dict[str, Any], prefix: str = "") -> None:
        content = body.get("content")
        if content is not None and not isinstance(content, str):
            raise _form_error(prefix + "content", "STRING_TYPE_CONVERT", "Could not interpret value as string.")
        if len(content or "") > MESSAGE_LIMIT:
            raise _form_error(
                prefix + "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MESSAGE_LIMIT} or fewer in length."
            )
        if not (content or "").strip() and not any(
            body.get(k) for k in ("embeds", "attachments", "sticker_ids", "components", "poll")
        ):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        allowed = body.get("allowed_mentions")
        if allowed is not None:
            parse = allowed.get("parse", [])
            if any(p not in ("users", "roles", "everyone") for p in parse):
                raise _form_error(prefix + "allowed_mentions.parse", "BASE_TYPE_CHOICES", "Value must be one of.")
            for kind in ("users", "roles"):
                if kind in parse and allowed.get(kind):
                    raise _form_error(
                        prefix + "allowed_mentions",
                        "MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                        f'parse:["{kind}"] and {kind}: [ids] are mutually exclusive.',
                    )

    def pings(self, message: dict[str, Any], body: dict[str, Any], channel: Channel) -> dict[str, Any]:
        """Who Discord would notify for a message the bot posted: users, roles, @everyone."""
        w = self.world
        allowed = body.get("allowed_mentions")
        if allowed is None:
            parse, users, roles, replied_user = {"users", "roles", "everyone"}, [], [], True
        else:
            parse = set(allowed.get("parse", []))
            users, roles = allowed.get("users", []), allowed.get("roles", [])
            replied_user = bool(allowed.get("replied_user", False))
        pinged_users = {u["id"] for u in message["mentions"] if "users" in parse or u["id"] in users}
        referenced = message.get("referenced_message")
        if referenced and replied_user:
            pinged_users.add(referenced["author"]["id"])
        can_everyone = bool(w.permissions_in(w.bot_user.id, channel) & MENTION_EVERYONE) or channel.guild_id is None
        pinged_roles = {
            r
            for r in message["mention_roles"]
            if ("roles" in parse and (w.roles[int(r)].mentionable or can_everyone)) or r in roles
        }
        everyone = message["mention_everyone"] and "everyone" in parse
        return {"users": sorted(pinged_users), "roles": sorted(pinged_roles), "everyone": bool(everyone)}

    async def _post_message(self, request: web.Request) -> web.Response:
        w = self.world
        channel = self._channel(request)
        body = await request.json()
        if not w.can_send(w.bot_user.id, channel):
            raise DiscordError(403, 50013, "Missing Permissions")
        self._validate_content(body)
        nonce = body.get("nonce")
        if nonce is not None and body.get("enforce_nonce"):
            for earlier in self.bot_messages:  # a retried request must not post twice
                if earlier.get("nonce") == nonce and earlier["channel_id"] == str(channel.id):
                    return _json({k: v for k, v in earlier.items() if k != "pings"})
        reference = body.get("message_reference")
        if reference is not None:
            target_channel = w.channels.get(int(reference.get("channel_id") or channel.id))
            target = target_channel.messages.get(int(reference["message_id"])) if target_channel else None
            if target is None:
                if reference.get("fail_if_not_exists", True):
                    raise _form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
                reference = None
            else:
                reference = {
                    "type": 0,
                    "message_id": target["id"],
                    "channel_id": target["channel_id"],
                    "fail_if_not_exists": bool(reference.get("fail_if_not_exists", True)),
                }
                if channel.guild_id:
                    reference["guild_id"] = str(channel.guild_id)
        message = w.message_payload(
            channel,
            w.bot_user,
            body.get("content") or "",
            type=19 if reference else 0,
            reference=reference,
            flags=int(body.get("flags") or 0),
            nonce=body.get("nonce"),
        )
        channel.messages[int(message["id"])] = message
        # `pings` and `posted_at` are the fake's own bookkeeping (who Discord would notify, and when the
        # message was posted); they never go to the bot.
        record = {**message, "pings": self.pings(message, body, channel), "posted_at": request[_CALL].time}
        self.bot_messages.append(record)
        await self.dispatch("MESSAGE_CREATE", message)  # Discord echoes the bot's own messages too
        return _json(message)

    async def _edit_message(self, request: web.Request) -> web.Response:
        """PATCH a message: only its author may, with the same content rules as posting; MESSAGE_UPDATE follows."""
        w = self.world
        channel = self._channel(request)
        try:
            old = channel.messages[int(request.match_info["message"])]
        except (KeyError, ValueError):
            raise DiscordError(404, 10008, "Unknown Message") from None
        if old["author"]["id"] != str(w.bot_user.id):
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        body = await request.json()
        if not isinstance(body, dict):
            raise _form_error("_root", "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
        self._validate_content({"content": old["content"], **body})
        content = old["content"] if body.get("content") is None else body["content"]
        users, roles = w.mentions_in(content, channel)
        everyone = ("@everyone" in content or "@here" in content) and (
            channel.guild_id is None or bool(w.permissions_in(w.bot_user.id, channel) & MENTION_EVERYONE)
        )
        edited = {
            **old,
            "content": content,
            "mentions": users,
            "mention_roles": roles,
            "mention_everyone": everyone,
            "edited_timestamp": iso(),
        }
        channel.messages[int(edited["id"])] = edited
        # Who an edit could notify, by the same rules as a post (Discord notifies no one for an edit, but
        # the bot must not lean on that: its edits carry no-mentions too).
        pings = self.pings(edited, body, channel)
        self.bot_edits.append(
            {
                "id": edited["id"],
                "channel_id": edited["channel_id"],
                "content": content,
                "time": request[_CALL].time,  # as in calls and message_edits()
                "allowed_mentions": body.get("allowed_mentions"),
                "pings": pings,
            }
        )
        changed = ("content", "mentions", "mention_roles", "mention_everyone", "edited_timestamp")
        for record in self.bot_messages:  # the tests' view of the bot's messages shows them as they are now
            if record["id"] == edited["id"]:
                record.update({k: edited[k] for k in changed})
        await self.dispatch("MESSAGE_UPDATE", edited)
        return _json(edited)

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        w = self.world
        try:
            record = self.interactions[int(request.match_info["interaction"])]
        except (KeyError, ValueError):
            raise DiscordError(404, 10062, "Unknown interaction") from None
        if request.match_info["token"] != record.token:
            raise DiscordError(401, 50027, "Invalid Webhook Token")
        now = time.monotonic()
        if now - record.created > INTERACTION_DEADLINE_S:
            raise DiscordError(404, 10062, "Unknown interaction")
        if record.responses:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        body = await request.json()
        kind = body.get("type")
        if kind not in (4, 5):  # channel message / deferred channel message (app commands allow these)
            raise _form_error("type", "BASE_TYPE_CHOICES", "Value must be one of {4, 5}.")
        data = body.get("data") or {}
        if kind == 4:
            self._validate_content(data, "data.")
        record.responses.append(body)
        record.response_times.append(now)
        flags = int(data.get("flags") or 0)
        message = w.message_payload(record.channel, w.bot_user, data.get("content") or "", type=20, flags=flags)
        message["interaction_metadata"] = {
            "id": str(record.id),
            "type": 2,
            "user": record.user.payload(),
            "authorizing_integration_owners": {},
            "name": record.name,
        }
        if not flags & EPHEMERAL and kind == 4:
            record.channel.messages[int(message["id"])] = message
            self.bot_messages.append({**message, "pings": self.pings(message, data, record.channel)})
            await self.dispatch("MESSAGE_CREATE", message)
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        return _json(
            {
                "interaction": {
                    "id": str(record.id),
                    "type": 2,
                    "response_message_id": message["id"],
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(flags & EPHEMERAL),
                },
                "resource": {"type": kind, "message": message},
            }
        )

    async def _followup(self, request: web.Request) -> web.Response:
        w = self.world
        if request.match_info["app"] != str(w.application_id):
            raise DiscordError(404, 10015, "Unknown Webhook")
        record = next((r for r in self.interactions.values() if r.token == request.match_info["token"]), None)
        if record is None or not record.responses:
            raise DiscordError(404, 10015, "Unknown Webhook")
        body = await request.json()
        self._validate_content(body)
        record.followups.append(body)
        message = w.message_payload(
            record.channel, w.bot_user, body.get("content") or "", type=20, flags=int(body.get("flags") or 0)
        )
        return _json(message)
