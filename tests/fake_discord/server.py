"""A fake Discord on loopback, as tests drive it: `FakeDiscord`.

The real, unmodified discord.py client logs in to it. Point `discord.http.Route.BASE` at
`FakeDiscord.api_base` and `discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY` at
`FakeDiscord.gateway_url` (discord.py's plain `Client` connects to its default gateway without asking
`GET /gateway/bot`; the sharded client asks, and the fake answers that too).

One aiohttp server on 127.0.0.1 serves two parts that share the `World` (`world.py`): the REST API under
/api/v10 (`rest.py`, strict where Discord is, by the rules in `rules.py`) and the gateway websocket
(`gateway.py`). `FakeDiscord` starts and stops it, and is what tests talk to.

Shards work as on Discord: `GET /gateway/bot` recommends `recommended_shards`, each IDENTIFY's
`shard: [id, count]` (default `[0, 1]`) is a session of its own, a guild's events go only to the session
of shard `(guild_id >> 22) % count`, and DMs only to shard 0. An invalid shard is closed with 4010, and
fewer shards than `required_shards` with 4011 (sharding required).

Tests play the users: `send()` pushes MESSAGE_CREATE, `slash()` pushes INTERACTION_CREATE, and the
`wait_*` helpers wait (with timeouts, never fixed sleeps) for what the bot does over REST. Every REST
call is recorded with its method, path, JSON body, time and the status the fake answered.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from aiohttp import web

from tests.fake_discord.gateway import Gateway, Heartbeat
from tests.fake_discord.rest import API_PREFIX, Interaction, Rest, RestCall
from tests.fake_discord.rules import MESSAGE_LIMIT, NITRO_MESSAGE_LIMIT
from tests.fake_discord.world import ADMINISTRATOR, GUILD_CATEGORY, Channel, Role, User, World, iso

TYPING_SHOWN_S = 10.0  # how long one typing request shows the indicator

T = TypeVar("T")


class CommandNotAvailable(AssertionError):
    """The test asked a user to run a slash command Discord would not show them."""


class _Of(Generic[T]):
    """An attribute kept by one of FakeDiscord's parts, under the same name on the fake:
    `fake.calls` is `fake.rest.calls`, and `fake.required_shards = 2` sets `fake.gateway.required_shards`."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Of[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object, owner: type | None = None) -> T | _Of[T]:
        if obj is None:
            return self
        value: T = getattr(getattr(obj, self.part), self.name)
        return value

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class FakeDiscord:
    """The fake Discord as tests use it: serves `rest` and `gateway` over one `world`, plays the users
    (`send`, `slash`, ...), and waits for and looks up what the bot did."""

    # What the gateway is told and records (see Gateway): settings a test may change before the bot
    # connects, then the record of IDENTIFYs, RESUMEs, heartbeats, close codes and deliveries.
    heartbeat_interval_ms: _Of[int] = _Of("gateway")
    privileged_intents: _Of[bool] = _Of("gateway")
    required_shards: _Of[int] = _Of("gateway")
    heartbeats: _Of[list[Heartbeat]] = _Of("gateway")
    gateway_log: _Of[list[tuple[float, str, Any]]] = _Of("gateway")
    identifies: _Of[int] = _Of("gateway")
    resumes: _Of[int] = _Of("gateway")
    close_codes: _Of[list[int | None]] = _Of("gateway")
    refusals: _Of[list[int]] = _Of("gateway")
    replayed: _Of[list[tuple[int, str]]] = _Of("gateway")
    deliveries: _Of[list[tuple[tuple[int, int], str, int | None]]] = _Of("gateway")
    connection_paths: _Of[list[str]] = _Of("gateway")
    # What REST is told and records (see Rest): every call, the synced commands, the interactions
    # users started, and the bot's messages and edits.
    recommended_shards: _Of[int] = _Of("rest")
    typing_delays: _Of[list[float]] = _Of("rest")
    calls: _Of[list[RestCall]] = _Of("rest")
    commands: _Of[dict[tuple[int | None, str], dict[str, Any]]] = _Of("rest")
    interactions: _Of[dict[int, Interaction]] = _Of("rest")
    bot_messages: _Of[list[dict[str, Any]]] = _Of("rest")
    bot_edits: _Of[list[dict[str, Any]]] = _Of("rest")

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
        self._token = token
        self._cond = asyncio.Condition()
        self.gateway = Gateway(
            self.world,
            token,
            self._changed,
            heartbeat_interval_ms=heartbeat_interval_ms,
            privileged_intents=privileged_intents,
            required_shards=required_shards,
        )
        self.rest = Rest(self.world, token, self.gateway, self._changed, recommended_shards=recommended_shards)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def token(self) -> str:
        """The bot token REST and the gateway accept (fixed when the fake is made)."""
        return self._token

    # ----- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(middlewares=[self.rest.middleware], client_max_size=8 * 1024 * 1024)
        self.gateway.add_routes(app.router)
        self.rest.add_routes(app.router)  # last: it ends with the catch-all 404
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.gateway.url, self.gateway.resume_url = self.gateway_url, self.resume_url
        return self

    async def stop(self) -> None:
        await self.gateway.close()
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
            lambda: self.gateway.session is not None and self.gateway.session.conn is not None,
            timeout=timeout,
            what="the bot to IDENTIFY",
        )

    async def wait_shards(self, *shard_ids: int, timeout: float = 15.0) -> None:
        """Wait until each of `shard_ids` has a connected session."""
        await self.wait_for(
            lambda: all(i in self.gateway.shards and self.gateway.shards[i].conn is not None for i in shard_ids),
            timeout=timeout,
            what=f"shards {shard_ids} to IDENTIFY",
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
        response = await self.wait_for(
            lambda: interaction.response, timeout=timeout, what=f"a response to /{interaction.name}"
        )
        assert response is not None  # wait_for returns once the predicate is truthy
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

    @property
    def session_intents(self) -> int | None:
        return self.gateway.session.intents if self.gateway.session else None

    @property
    def shard_sessions(self) -> dict[int, tuple[int, int]]:
        """Shard id -> (id, count) of the newest session IDENTIFYed as that shard."""
        return {shard_id: session.shard for shard_id, session in self.gateway.shards.items()}

    def failed_calls(self) -> list[RestCall]:
        return [c for c in self.calls if c.status >= 400]

    # ----- the users' side ---------------------------------------------------------------------

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
        await self.gateway.dispatch("MESSAGE_CREATE", message)
        return message

    async def edit(self, message: dict[str, Any], content: str) -> dict[str, Any]:
        """The author edits `message`; the bot receives MESSAGE_UPDATE with the new content."""
        channel = self.world.channels[int(message["channel_id"])]
        users, roles = self.world.mentions_in(content, channel)
        edited = {**message, "content": content, "mentions": users, "mention_roles": roles, "edited_timestamp": iso()}
        if int(message["id"]) in channel.messages:
            channel.messages[int(message["id"])] = edited
        await self.gateway.dispatch("MESSAGE_UPDATE", edited)
        return edited

    async def delete(self, message: dict[str, Any]) -> None:
        """The author deletes `message`; the bot receives MESSAGE_DELETE and replies can't reference it."""
        channel = self.world.channels[int(message["channel_id"])]
        channel.messages.pop(int(message["id"]), None)
        data = {"id": message["id"], "channel_id": message["channel_id"]}
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
        await self.gateway.dispatch("MESSAGE_DELETE", data)

    def attachment(
        self,
        filename: str = "cat.png",
        size: int | None = None,
        *,
        content: bytes | None = None,
        content_type: str | None = None,
        delay: float = 0.0,
    ) -> dict[str, Any]:
        """An attachment payload as Discord sends it in MESSAGE_CREATE; its URL (on the fake) serves
        `content` (by default `size` bytes of a PNG-looking file) after `delay` seconds. `size` is what
        the payload claims, by default the content's length (a test may make it lie)."""
        aid = self.world.ids.next()
        url = f"{self.base_url}/attachments/{aid}/{filename}"
        if content is None:
            content = b"\x89PNG\r\n\x1a\n" + bytes(max(0, (size or 12345) - 8))
            content_type = content_type or "image/png"
        content_type = content_type or "application/octet-stream"
        self.rest.files[aid] = (content, content_type, delay)
        payload: dict[str, Any] = {
            "id": str(aid),
            "filename": filename,
            "size": len(content) if size is None else size,
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }
        if content_type.startswith("image/"):
            payload.update(width=64, height=64)
        return payload

    async def press(self, user: User, message: dict[str, Any], custom_id: str, *, force: bool = False) -> Interaction:
        """`user` presses the button `custom_id` on `message` (one of the bot's); the bot receives
        INTERACTION_CREATE of type 3 (a message component). Like Discord, the fake refuses
        (CommandNotAvailable) a button the message does not show; `force=True` presses it anyway."""
        w = self.world
        channel = w.channels[int(message["channel_id"])]
        current = channel.messages.get(int(message["id"]), message)
        buttons = [c.get("custom_id") for row in current.get("components", []) for c in row.get("components", [])]
        if custom_id not in buttons and not force:
            raise CommandNotAvailable(f"message {message['id']} shows no button {custom_id!r} (it has {buttons})")
        iid, token, payload = self._interaction_payload(
            3, {"custom_id": custom_id, "component_type": 2}, user, channel, message=current
        )
        record = Interaction(iid, token, custom_id, user, channel, payload, time.monotonic(), kind=3, message=current)
        self.interactions[iid] = record
        await self.gateway.dispatch("INTERACTION_CREATE", payload)
        return record

    def buttons_on(self, message: dict[str, Any]) -> list[str]:
        """The custom_ids of the buttons `message` (one of the bot's) shows now."""
        channel = self.world.channels[int(message["channel_id"])]
        current = channel.messages.get(int(message["id"]), message)
        return [c.get("custom_id") for row in current.get("components", []) for c in row.get("components", [])]

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

    async def add_text_channel(self, name: str, *, category: Channel | None = None) -> Channel:
        channel = self.world.add_text_channel(name, category=category)
        await self.gateway.dispatch("CHANNEL_CREATE", channel.payload())
        return channel

    async def add_category(self, name: str) -> Channel:
        category = self.world.add_text_channel(name, type=GUILD_CATEGORY)
        await self.gateway.dispatch("CHANNEL_CREATE", category.payload())
        return category

    async def add_thread(self, name: str, parent: Channel, owner: User) -> Channel:
        thread = self.world.add_thread(name, parent, owner)
        await self.gateway.dispatch("THREAD_CREATE", {**thread.payload(), "newly_created": True})
        return thread

    async def remove_bot(self, guild_id: int) -> None:
        """The bot is kicked from a server (or the server deleted): GUILD_DELETE without `unavailable`,
        as Discord sends it; the server's channels are gone for the bot."""
        guild = self.world.guilds.pop(guild_id)
        for channel_id in [c.id for c in self.world.channels.values() if c.guild_id == guild.id]:
            del self.world.channels[channel_id]
        await self.gateway.dispatch("GUILD_DELETE", {"id": str(guild_id)})

    async def slash(
        self, user: User, channel: Channel, name: str, /, *, force: bool = False, age: float = 0.0, **options: Any
    ) -> Interaction:
        """`user` runs `/name option:value ...` in `channel`; the bot receives INTERACTION_CREATE.

        Like Discord, the fake refuses (CommandNotAvailable) a command that was never synced, that
        is not allowed in this context, or that `default_member_permissions` hides from this
        user; `force=True` delivers it anyway, as a stale client or a crafted request could.
        `age` makes it that many seconds old on arrival (as one replayed after a RESUME can be).
        """
        w = self.world
        guild_id = channel.guild_id
        command_name, _, sub = name.partition(" ")
        subcommand = sub or None
        command = self.commands.get((guild_id, command_name)) if guild_id else None
        command = command or self.commands.get((None, command_name))
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

        data: dict[str, Any] = {"id": command["id"], "name": command_name, "type": 1}
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        defs = {o["name"]: o for o in command.get("options", [])}
        if subcommand is not None:  # `/group sub ...`: the group's options are its subcommands (type 1)
            if subcommand not in defs or defs[subcommand]["type"] != 1:
                raise CommandNotAvailable(f"/{command_name} has no subcommand {subcommand!r}")
            defs = {o["name"]: o for o in defs[subcommand].get("options", [])}
        elif any(o["type"] in (1, 2) for o in defs.values()):
            raise CommandNotAvailable(f"/{name} is a group: name one of its subcommands")
        values = []
        resolved: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            if key not in defs:
                raise CommandNotAvailable(f"/{name} has no option {key!r}")
            choices = defs[key].get("choices")
            if choices and value not in [c["value"] for c in choices]:
                raise CommandNotAvailable(f"{value!r} is not a choice of /{name} {key}")
            value = self._option_value(defs[key], value, user, channel, resolved)
            values.append({"name": key, "type": defs[key]["type"], "value": value})
        missing = [k for k, o in defs.items() if o.get("required") and k not in options]
        if missing:
            raise CommandNotAvailable(f"/{name} needs {missing}")
        if subcommand is not None:
            values = [{"name": subcommand, "type": 1, "options": values}]
        if values:
            data["options"] = values
        if resolved:
            data["resolved"] = resolved

        iid, token, payload = self._interaction_payload(2, data, user, channel)
        record = Interaction(iid, token, name, user, channel, payload, time.monotonic() - age)
        self.interactions[iid] = record
        await self.gateway.dispatch("INTERACTION_CREATE", payload)
        return record

    def _interaction_payload(
        self, kind: int, data: dict[str, Any], user: User, channel: Channel, **extra: Any
    ) -> tuple[int, str, dict[str, Any]]:
        """A new interaction of `kind` by `user` in `channel`, as Discord sends it in INTERACTION_CREATE:
        its id, its token and the payload (`extra` adds fields, such as a component's `message`)."""
        w = self.world
        guild_id = channel.guild_id
        perms = w.permissions_in(user.id, channel)
        iid = w.ids.next()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(w.application_id),
            "type": kind,
            "data": data,
            **extra,
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "token": token,
            "version": 1,
            "app_permissions": str(w.permissions_in(w.bot_user.id, channel) if guild_id else perms),
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id) if guild_id else "0"},
            "context": 0 if guild_id else 1,
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
        return iid, token, payload

    def _option_value(
        self, option: dict[str, Any], value: Any, user: User, channel: Channel, resolved: dict[str, dict[str, Any]]
    ) -> Any:
        """An option's value as Discord sends it; a channel, user or role also goes into `resolved`, as
        Discord does (with the invoking member's permissions in a resolved channel)."""
        kind, w = option["type"], self.world
        if kind == 7:  # CHANNEL
            assert isinstance(value, Channel), f"option {option['name']} takes a Channel"
            allowed = option.get("channel_types")
            if allowed and value.type not in allowed:
                raise CommandNotAvailable(f"option {option['name']} takes channel types {allowed}, not {value.type}")
            if value.guild_id != channel.guild_id:
                raise CommandNotAvailable("Discord offers only this server's channels")
            data = {**value.payload(), "permissions": str(w.permissions_in(user.id, value))}
            resolved.setdefault("channels", {})[str(value.id)] = data
            return str(value.id)
        if kind in (6, 8, 9):  # USER, ROLE, MENTIONABLE
            if isinstance(value, Role):
                if kind == 6:
                    raise CommandNotAvailable(f"option {option['name']} takes a user")
                resolved.setdefault("roles", {})[str(value.id)] = value.payload()
                return str(value.id)
            assert isinstance(value, User), f"option {option['name']} takes a User or a Role"
            if kind == 8:
                raise CommandNotAvailable(f"option {option['name']} takes a role")
            resolved.setdefault("users", {})[str(value.id)] = value.payload()
            members = w.guild_members(channel.guild_id)
            if value.id in members:
                member = members[value.id].payload(with_user=False)
                member["permissions"] = str(w.permissions_in(value.id, channel))
                resolved.setdefault("members", {})[str(value.id)] = member
            return str(value.id)
        return value

    # ----- the gateway, driven ------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Push a gateway event to the bot, as Discord would (see `Gateway.dispatch`)."""
        await self.gateway.dispatch(event, data)

    async def request_reconnect(self) -> None:
        """Send RECONNECT (op 7): the client should drop the socket and RESUME on resume_gateway_url."""
        await self.gateway.request_reconnect()
