"""The fake's gateway: the websocket the bot keeps open for events (`/gateway`, and `/resume` for
`resume_gateway_url`).

It speaks Discord's protocol: HELLO, heartbeats and their ACKs, IDENTIFY (checked for token, intents and
shard), READY plus one GUILD_CREATE per guild of the shard, RESUME with replay of what the session missed,
RECONNECT on request, and Discord's close codes for what it refuses. `Gateway.dispatch` sends an event
to the session(s) of the shard it belongs to. Everything is recorded for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from tests.fake_discord.world import INTENT_MESSAGE_CONTENT, World, shard_of

log = logging.getLogger("fake_discord")


@dataclass
class Heartbeat:
    time: float
    connection: int
    sequence: int | None


class Connection:
    """One gateway websocket."""

    def __init__(self, ident: int, ws: web.WebSocketResponse, path: str, compress: bool) -> None:
        self.id = ident
        self.ws = ws
        self.path = path
        self.compressor = zlib.compressobj() if compress else None
        self.lock = asyncio.Lock()
        self.session: Session | None = None

    async def send(self, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, separators=(",", ":"))
        if self.compressor is not None:  # zlib-stream: one shared context, each message sync-flushed
            data = self.compressor.compress(text.encode()) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(text)


class Session:
    """One IDENTIFYed session: it outlives its connection, so that a RESUME can replay what it missed."""

    def __init__(self, session_id: str, intents: int, shard: tuple[int, int] = (0, 1)) -> None:
        self.id = session_id
        self.intents = intents
        self.shard = shard  # (shard id, shard count)
        self.seq = 0
        self.log: list[tuple[int, str, dict[str, Any]]] = []
        self.conn: Connection | None = None
        self.lock = asyncio.Lock()
        self.invalid = False


class Gateway:
    """The gateway's sessions and what happened on them. `changed` wakes the tests' waiters."""

    def __init__(
        self,
        world: World,
        token: str,
        changed: Callable[[], Awaitable[None]],
        *,
        heartbeat_interval_ms: int,
        privileged_intents: bool,
        required_shards: int,
    ) -> None:
        self.world = world
        self.token = token
        self._changed = changed
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.privileged_intents = privileged_intents
        self.required_shards = required_shards  # an IDENTIFY with fewer shards is closed with 4011
        # Where the bot connects and resumes; set once the fake listens (it binds port 0).
        self.url = ""
        self.resume_url = ""

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

        self.sessions: dict[str, Session] = {}
        self.session: Session | None = None  # the bot's newest session
        self.shards: dict[int, Session] = {}  # shard id -> the newest session that IDENTIFYed as that shard
        self._connections = 0
        self._sockets: set[web.WebSocketResponse] = set()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/gateway", self._serve)
        router.add_get("/resume", self._serve)

    async def close(self) -> None:
        """Close every open socket, as Discord going away does (1001)."""
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"fake discord stopping")

    # ----- dispatching events --------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH (op 0) to the session(s) of the shard it belongs to: the guild's shard, or shard 0
        for a DM. Kept in each session's log for RESUME."""
        guild_id = data.get("id" if event in ("GUILD_CREATE", "GUILD_DELETE") else "guild_id")
        sessions = [s for s in self.shards.values() if self._routes_to(s, int(guild_id) if guild_id else None)]
        if not sessions:
            where = f"guild {guild_id}" if guild_id else "a DM"
            raise AssertionError(f"no gateway session for the shard of {where} to dispatch {event} to")
        for session in sessions:
            async with session.lock:
                await self._dispatch_locked(session, event, data)
        await self._changed()

    @staticmethod
    def _routes_to(session: Session, guild_id: int | None) -> bool:
        """Whether Discord sends an event of `guild_id` (None: a DM) to `session`."""
        shard_id, count = session.shard
        return shard_id == 0 if guild_id is None else shard_of(guild_id, count) == shard_id

    async def _dispatch_locked(self, session: Session, event: str, data: dict[str, Any] | None) -> None:
        guild = (data or {}).get("id" if event in ("GUILD_CREATE", "GUILD_DELETE") else "guild_id")
        self.deliveries.append((session.shard, event, int(guild) if guild else None))
        session.seq += 1
        session.log.append((session.seq, event, data))  # type: ignore[arg-type]
        if session.conn is not None:
            await self._send_event(session.conn, session, session.seq, event, data)

    async def _send_event(
        self, conn: Connection, session: Session, seq: int, event: str, data: dict[str, Any] | None
    ) -> None:
        if event == "MESSAGE_CREATE" and data is not None:
            data = self._redact(session, data)
        self.gateway_log.append((time.monotonic(), f"send {event}", seq))
        try:
            async with conn.lock:
                await conn.send({"op": 0, "t": event, "s": seq, "d": data})
        except (ConnectionResetError, RuntimeError) as exc:  # closed under us; RESUME replays it
            log.debug("could not send %s: %s", event, exc)

    def _redact(self, session: Session, message: dict[str, Any]) -> dict[str, Any]:
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
        session = self.session
        assert session is not None and session.conn is not None, "the bot is not connected"
        conn = session.conn
        self.gateway_log.append((time.monotonic(), "send op 7", None))
        async with conn.lock:
            await conn.send({"op": 7, "d": None})

    # ----- the socket ----------------------------------------------------------------------------

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        self._sockets.add(ws)
        self._connections += 1
        self.connection_paths.append(request.path)
        q = request.query
        conn = Connection(self._connections, ws, request.path, q.get("compress") == "zlib-stream")
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
                    await self._on_message(conn, payload)
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

    async def _on_message(self, conn: Connection, payload: dict[str, Any]) -> None:
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

    async def _identify(self, conn: Connection, d: Any) -> None:
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
        session = Session(secrets.token_hex(16), intents, (shard[0], shard[1]))
        self.sessions[session.id] = session
        self.session = session
        self.shards[shard[0]] = session
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

    async def _resume(self, conn: Connection, d: Any) -> None:
        session = self.sessions.get(d.get("session_id", "")) if isinstance(d, dict) else None
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
