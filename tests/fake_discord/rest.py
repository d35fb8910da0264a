"""The fake's REST API under /api/v10, as the bot's discord.py client calls it.

Every call is recorded (`RestCall`: method, path, JSON body, time, and the status and body the fake
answered) and checked the way Discord checks it (`rules.py`): a bad token, an unknown channel, missing
permissions, an empty or over-long message, a bad message reference, a late or repeated interaction
response or an invalid command definition gets Discord's status code and error JSON. What the bot posts,
edits and syncs is kept for the tests, and each post or edit is echoed on the gateway as Discord does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_discord.gateway import Gateway
from tests.fake_discord.rules import (
    DiscordError,
    form_error,
    pings,
    validate_command,
    validate_components,
    validate_content,
)
from tests.fake_discord.world import MENTION_EVERYONE, VIEW_CHANNEL, Channel, User, World, iso

API_PREFIX = "/api/v10"
EPHEMERAL = 1 << 6
INTERACTION_DEADLINE_S = 3.0  # Discord forgets an interaction not answered within 3 seconds


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
class Interaction:
    """A slash command a user ran (`FakeDiscord.slash`) or a button they pressed (`FakeDiscord.press`:
    `kind` 3, `name` the button's custom_id, `message` the message it is on), and what the bot
    answered to it over REST."""

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
    kind: int = 2  # 2: a slash command; 3: a message component (a button)
    message: dict[str, Any] | None = None

    @property
    def response(self) -> dict[str, Any] | None:
        return self.responses[0] if self.responses else None


def _json(data: Any, status: int = 200) -> web.Response:
    """JSON the way Discord sends it: `Content-Type: application/json` exactly (discord.py compares it)."""
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


class Rest:
    """The REST routes and what the bot did through them. `changed` wakes the tests' waiters; posts and
    edits are echoed as gateway events through `gateway`."""

    def __init__(
        self,
        world: World,
        token: str,
        gateway: Gateway,
        changed: Callable[[], Awaitable[None]],
        *,
        recommended_shards: int,
    ) -> None:
        self.world = world
        self.token = token
        self.gateway = gateway
        self._changed = changed
        self.recommended_shards = recommended_shards  # what GET /gateway/bot answers

        self.calls: list[RestCall] = []
        self.commands: dict[tuple[int | None, str], dict[str, Any]] = {}  # (guild id or None, name) -> command
        self.interactions: dict[int, Interaction] = {}
        self.bot_messages: list[dict[str, Any]] = []  # every message the bot created, in order, as it is now
        self.bot_edits: list[dict[str, Any]] = []  # every edit of one: message id, content, time, allowed_mentions
        self.typing_delays: list[float] = []  # each typing request takes the next delay (s), if any, to answer
        # What attachment URLs serve: attachment id -> (the bytes, content type, seconds before answering).
        self.files: dict[int, tuple[bytes, str, float]] = {}
        self.file_requests: list[int] = []  # the attachment ids the bot downloaded, in order

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """The API routes, then a catch-all 404 (so add any other routes before these)."""
        r, p = router, API_PREFIX
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
        r.add_get("/attachments/{attachment}/{filename}", self._get_attachment)
        r.add_route("*", "/{tail:.*}", self._unknown)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Record each API call, check the bot's token, and answer a `DiscordError` as Discord would."""
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

    # ----- the handlers ------------------------------------------------------------------------

    async def _unknown(self, request: web.Request) -> web.Response:
        if not request.path.startswith(API_PREFIX):
            return _json({"message": "404: Not Found", "code": 0}, status=404)
        raise DiscordError(404, 0, "404: Not Found")

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway.url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.gateway.url,
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
            raise form_error("_root", "BASE_TYPE_BAD_LENGTH", "Must be between 0 and 100 in length.")
        names: set[str] = set()
        stored: dict[str, dict[str, Any]] = {}
        for index, cmd in enumerate(body):
            validate_command(index, cmd)
            if cmd["name"] in names:
                raise form_error(
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

    async def _post_message(self, request: web.Request) -> web.Response:
        w = self.world
        channel = self._channel(request)
        body = await request.json()
        if not w.can_send(w.bot_user.id, channel):
            raise DiscordError(403, 50013, "Missing Permissions")
        validate_content(body)
        validate_components(body)
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
                    raise form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
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
        message["components"] = body.get("components") or []
        channel.messages[int(message["id"])] = message
        # `pings` and `posted_at` are the fake's own bookkeeping (who Discord would notify, and when the
        # message was posted); they never go to the bot.
        record = {**message, "pings": pings(self.world, message, body, channel), "posted_at": request[_CALL].time}
        self.bot_messages.append(record)
        await self.gateway.dispatch("MESSAGE_CREATE", message)  # Discord echoes the bot's own messages too
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
            raise form_error("_root", "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
        validate_content({"content": old["content"], **body})
        validate_components(body)
        return _json(await self._update_message(request, channel, old, body))

    async def _update_message(
        self, request: web.Request, channel: Channel, old: dict[str, Any], body: dict[str, Any]
    ) -> dict[str, Any]:
        """Apply an edit of the bot's message `old` (PATCH, or an UPDATE_MESSAGE interaction callback):
        recorded in `bot_edits` with who it could ping, echoed as MESSAGE_UPDATE; the message as it is now."""
        w = self.world
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
            "components": old.get("components", []) if body.get("components") is None else body["components"],
        }
        channel.messages[int(edited["id"])] = edited
        # Who an edit could notify, by the same rules as a post (Discord notifies no one for an edit, but
        # the bot must not lean on that: its edits carry no-mentions too).
        could_ping = pings(self.world, edited, body, channel)
        self.bot_edits.append(
            {
                "id": edited["id"],
                "channel_id": edited["channel_id"],
                "content": content,
                "time": request[_CALL].time,  # as in calls and message_edits()
                "allowed_mentions": body.get("allowed_mentions"),
                "pings": could_ping,
                "components": edited["components"],
            }
        )
        changed = ("content", "mentions", "mention_roles", "mention_everyone", "edited_timestamp", "components")
        for record in self.bot_messages:  # the tests' view of the bot's messages shows them as they are now
            if record["id"] == edited["id"]:
                record.update({k: edited[k] for k in changed})
        await self.gateway.dispatch("MESSAGE_UPDATE", edited)
        return edited

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
        # 4: a message, 5: "thinking..." then a follow-up; a button may also take 6 (DEFERRED_UPDATE_MESSAGE:
        # nothing changes now) and 7 (UPDATE_MESSAGE: its message is edited).
        allowed = (4, 5, 6, 7) if record.kind == 3 else (4, 5)
        if kind not in allowed:
            raise form_error("type", "BASE_TYPE_CHOICES", f"Value must be one of {set(allowed)}.")
        data = body.get("data") or {}
        if kind == 4:
            validate_content(data, "data.")
        if kind == 7:
            assert record.message is not None
            channel = w.channels[int(record.message["channel_id"])]
            old = channel.messages.get(int(record.message["id"]))
            if old is None:
                raise DiscordError(404, 10008, "Unknown Message")
            validate_content({"content": old["content"], **data}, "data.")
            validate_components(data, "data.")
        record.responses.append(body)
        record.response_times.append(now)
        if kind in (6, 7):
            if kind == 7:
                assert old is not None  # looked up above
                await self._update_message(request, channel, old, data)
            if request.query.get("with_response") not in ("1", "true", "True"):
                return web.Response(status=204)
            return _json({"interaction": {"id": str(record.id), "type": 3}, "resource": {"type": kind}})
        flags = int(data.get("flags") or 0)
        message = w.message_payload(record.channel, w.bot_user, data.get("content") or "", type=20, flags=flags)
        message["interaction_metadata"] = {
            "id": str(record.id),
            "type": record.kind,
            "user": record.user.payload(),
            "authorizing_integration_owners": {},
            "name": record.name,
        }
        if not flags & EPHEMERAL and kind == 4:
            record.channel.messages[int(message["id"])] = message
            self.bot_messages.append({**message, "pings": pings(self.world, message, data, record.channel)})
            await self.gateway.dispatch("MESSAGE_CREATE", message)
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
        validate_content(body)
        record.followups.append(body)
        message = w.message_payload(
            record.channel, w.bot_user, body.get("content") or "", type=20, flags=int(body.get("flags") or 0)
        )
        return _json(message)

    async def _get_attachment(self, request: web.Request) -> web.StreamResponse:
        """An attachment's URL (Discord's CDN): the file's bytes, with its content type."""
        try:
            attachment_id = int(request.match_info["attachment"])
            data, content_type, delay = self.files[attachment_id]
        except (KeyError, ValueError):
            return web.Response(status=404, text="Not Found")
        self.file_requests.append(attachment_id)
        await self._changed()
        if delay:
            await asyncio.sleep(delay)  # a slow CDN
        return web.Response(body=data, headers={"Content-Type": content_type})
