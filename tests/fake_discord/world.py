"""The small world a fake Discord holds: a server, its channels, roles and members, and DMs.

Tests that need more servers (to spread them over shards) add plain ones with `add_guild`.

Payloads follow Discord's API v10 shapes (what discord.py 2.x reads in `types/`), so the real
client parses them exactly as it would parse Discord's. Permissions are computed the way Discord
does it: @everyone, then roles, then channel overwrites (@everyone, roles, member).
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1420070400000

# Permission bits (discord.Permissions values).
ADMINISTRATOR = 1 << 3
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_GUILD = 1 << 5
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_APPLICATION_COMMANDS = 1 << 31
CREATE_PUBLIC_THREADS = 1 << 35
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 51) - 1

EVERYONE_PERMISSIONS = (
    VIEW_CHANNEL
    | SEND_MESSAGES
    | ADD_REACTIONS
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_APPLICATION_COMMANDS
    | CREATE_PUBLIC_THREADS
    | SEND_MESSAGES_IN_THREADS
)

# Channel types.
GUILD_TEXT = 0
DM = 1
GUILD_CATEGORY = 4
PUBLIC_THREAD = 11

# Gateway intents.
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

_USER_MENTION = re.compile(r"<@!?(\d{15,21})>")
_ROLE_MENTION = re.compile(r"<@&(\d{15,21})>")


def iso(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, tz=dt.timezone.utc).isoformat()


class Snowflakes:
    """Real-looking snowflakes: milliseconds since the Discord epoch, shifted, plus a counter."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
            return (ms << 22) | (next(self._counter) & 0x3FFFFF)


@dataclass
class User:
    id: int
    username: str
    bot: bool = False
    global_name: str | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
        }

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass
class Role:
    id: int
    name: str
    permissions: int = 0
    position: int = 0
    managed: bool = False
    mentionable: bool = False
    bot_id: int | None = None

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": self.managed,
            "mentionable": self.mentionable,
            "flags": 0,
        }
        if self.bot_id is not None:
            data["tags"] = {"bot_id": str(self.bot_id)}
        return data

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"


@dataclass
class Member:
    user: User
    roles: list[int]
    joined_at: str = field(default_factory=iso)

    def payload(self, *, with_user: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nick": None,
            "avatar": None,
            "banner": None,
            "roles": [str(r) for r in self.roles],
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.payload()
        return data


@dataclass
class Overwrite:
    id: int
    type: int  # 0 role, 1 member
    allow: int = 0
    deny: int = 0

    def payload(self) -> dict[str, Any]:
        return {"id": str(self.id), "type": self.type, "allow": str(self.allow), "deny": str(self.deny)}


@dataclass
class Channel:
    id: int
    type: int
    name: str | None = None
    guild_id: int | None = None
    parent_id: int | None = None
    position: int = 0
    overwrites: list[Overwrite] = field(default_factory=list)
    recipient: User | None = None  # DMs: the user on the other side
    owner_id: int | None = None  # threads
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_thread(self) -> bool:
        return self.type == PUBLIC_THREAD

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def payload(self) -> dict[str, Any]:
        if self.type == DM:
            assert self.recipient is not None
            return {
                "id": str(self.id),
                "type": DM,
                "last_message_id": None,
                "recipients": [self.recipient.payload()],
            }
        if self.type == PUBLIC_THREAD:
            return {
                "id": str(self.id),
                "type": PUBLIC_THREAD,
                "guild_id": str(self.guild_id),
                "parent_id": str(self.parent_id),
                "owner_id": str(self.owner_id),
                "name": self.name,
                "last_message_id": None,
                "message_count": len(self.messages),
                "member_count": 2,
                "total_message_sent": len(self.messages),
                "rate_limit_per_user": 0,
                "flags": 0,
                "thread_metadata": {
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": iso(),
                    "locked": False,
                    "create_timestamp": iso(),
                },
            }
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [o.payload() for o in self.overwrites],
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": str(self.parent_id) if self.parent_id else None,
        }


@dataclass
class Guild:
    """A server: its @everyone role (whose id is the guild's), its members and its owner."""

    id: int
    name: str
    owner_id: int
    members: dict[int, Member] = field(default_factory=dict)
    role_ids: list[int] = field(default_factory=list)


def shard_of(guild_id: int, shard_count: int) -> int:
    """The shard Discord sends a guild's events to."""
    return (guild_id >> 22) % shard_count


class World:
    """One guild ("Test Server") with a few channels, a thread, people, roles and DMs; more guilds on request."""

    def __init__(self) -> None:
        self.ids = Snowflakes()
        self.application_id = self.ids.next()
        self.bot_user = User(self.application_id, "ChatBot", bot=True)
        self.owner = User(self.ids.next(), "owner", global_name="The Owner")
        self.admin = User(self.ids.next(), "alice", global_name="Alice")
        self.member = User(self.ids.next(), "bob", global_name="Bob")
        self.carol = User(self.ids.next(), "carol", global_name="Carol")
        self.other_bot = User(self.ids.next(), "OtherBot", bot=True)
        self.users: dict[int, User] = {
            u.id: u for u in (self.bot_user, self.owner, self.admin, self.member, self.carol, self.other_bot)
        }

        self.guild_id = self.ids.next()
        self.guild_name = "Test Server"
        self.roles: dict[int, Role] = {}
        self.everyone_role = self._add_role(Role(self.guild_id, "@everyone", EVERYONE_PERMISSIONS, position=0))
        self.mod_role = self._add_role(Role(self.ids.next(), "Moderators", MANAGE_MESSAGES, position=3))
        self.fans_role = self._add_role(Role(self.ids.next(), "Fans", 0, position=1, mentionable=True))
        self.bot_role = self._add_role(
            Role(
                self.ids.next(),
                "ChatBot",
                # Allowed to ping everyone: only allowed_mentions stands between the model and a ping.
                VIEW_CHANNEL
                | SEND_MESSAGES
                | SEND_MESSAGES_IN_THREADS
                | READ_MESSAGE_HISTORY
                | EMBED_LINKS
                | MENTION_EVERYONE,
                position=2,
                managed=True,
                bot_id=self.bot_user.id,
            )
        )
        self.members: dict[int, Member] = {}  # the main guild's members
        self.guilds: dict[int, Guild] = {
            self.guild_id: Guild(self.guild_id, self.guild_name, self.owner.id, self.members)
        }
        for user, roles in (
            (self.owner, []),
            (self.admin, [self.mod_role.id]),
            (self.member, [self.fans_role.id]),
            (self.carol, []),
            (self.other_bot, []),
            (self.bot_user, [self.bot_role.id]),
        ):
            self.members[user.id] = Member(user, roles)

        self.channels: dict[int, Channel] = {}
        self.general = self.add_text_channel("general")
        self.random = self.add_text_channel("random")
        self.announcements = self.add_text_channel(
            "announcements", overwrites=[Overwrite(self.guild_id, 0, deny=SEND_MESSAGES)]
        )
        self.thread = self._add(
            Channel(
                self.ids.next(),
                PUBLIC_THREAD,
                name="a thread",
                guild_id=self.guild_id,
                parent_id=self.general.id,
                owner_id=self.member.id,
            )
        )
        self.dms: dict[int, Channel] = {}

    # ----- building ----------------------------------------------------------------------------

    def _add_role(self, role: Role) -> Role:
        self.roles[role.id] = role
        return role

    def _add(self, channel: Channel) -> Channel:
        self.channels[channel.id] = channel
        return channel

    def add_guild(self, name: str, *, shard: tuple[int, int] | None = None) -> tuple[Guild, Channel]:
        """Another server with a #general channel, owned by `owner`, where every user and the bot are members
        with no roles but @everyone (and the bot's own managed role). `shard=(id, count)` picks an id whose
        events Discord sends to that shard."""
        guild_id = self.ids.next()
        if shard is not None:
            wanted, count = shard
            ms = guild_id >> 22
            guild_id = ((ms + (wanted - ms) % count) << 22) | (guild_id & 0x3FFFFF)
            assert shard_of(guild_id, count) == wanted
        everyone = self._add_role(Role(guild_id, "@everyone", EVERYONE_PERMISSIONS, position=0))
        bot_role = self._add_role(
            Role(
                self.ids.next(),
                "ChatBot",
                VIEW_CHANNEL | SEND_MESSAGES | SEND_MESSAGES_IN_THREADS | READ_MESSAGE_HISTORY | EMBED_LINKS,
                position=1,
                managed=True,
                bot_id=self.bot_user.id,
            )
        )
        guild = Guild(guild_id, name, self.owner.id, role_ids=[everyone.id, bot_role.id])
        for user in self.users.values():
            guild.members[user.id] = Member(user, [bot_role.id] if user.id == self.bot_user.id else [])
        self.guilds[guild_id] = guild
        return guild, self.add_text_channel("general", guild_id=guild_id)

    def guild_role_ids(self, guild_id: int) -> set[int]:
        """The roles of a guild: an added guild's own, and every other role for the main guild."""
        if guild_id != self.guild_id:
            return set(self.guilds[guild_id].role_ids)
        others = {r for g in self.guilds.values() if g.id != self.guild_id for r in g.role_ids}
        return set(self.roles) - others

    def guild_members(self, guild_id: int | None) -> dict[int, Member]:
        return self.guilds[guild_id].members if guild_id is not None else {}

    def add_text_channel(
        self,
        name: str,
        *,
        overwrites: list[Overwrite] | None = None,
        guild_id: int | None = None,
        category: Channel | None = None,
        type: int = GUILD_TEXT,
    ) -> Channel:
        """A text channel (or, with `type=GUILD_CATEGORY`, a category), in `category` if given."""
        guild_id = self.guild_id if guild_id is None else guild_id
        assert category is None or (category.type == GUILD_CATEGORY and category.guild_id == guild_id)
        position = sum(1 for c in self.channels.values() if c.type == type and c.guild_id == guild_id)
        return self._add(
            Channel(
                self.ids.next(),
                type,
                name=name,
                guild_id=guild_id,
                parent_id=category.id if category is not None else None,
                position=position,
                overwrites=list(overwrites or []),
            )
        )

    def add_thread(self, name: str, parent: Channel, owner: User) -> Channel:
        """A public thread in the text channel `parent`."""
        assert parent.type == GUILD_TEXT and parent.guild_id is not None
        return self._add(
            Channel(
                self.ids.next(),
                PUBLIC_THREAD,
                name=name,
                guild_id=parent.guild_id,
                parent_id=parent.id,
                owner_id=owner.id,
            )
        )

    def dm_with(self, user: User) -> Channel:
        """The DM channel between `user` and the bot (one per user, as on Discord)."""
        if user.id not in self.dms:
            self.dms[user.id] = self._add(Channel(self.ids.next(), DM, recipient=user))
        return self.dms[user.id]

    # ----- permissions -------------------------------------------------------------------------

    def base_permissions(self, user_id: int, guild_id: int | None = None) -> int:
        guild = self.guilds[self.guild_id if guild_id is None else guild_id]
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        member = guild.members.get(user_id)
        if member is None:
            return 0
        perms = self.roles[guild.id].permissions
        for role_id in member.roles:
            perms |= self.roles[role_id].permissions
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    def permissions_in(self, user_id: int, channel: Channel) -> int:
        """Discord's algorithm: base, then @everyone, role and member overwrites of the channel."""
        if channel.guild_id is None:
            return VIEW_CHANNEL | SEND_MESSAGES | READ_MESSAGE_HISTORY | EMBED_LINKS | ATTACH_FILES | ADD_REACTIONS
        perms = self.base_permissions(user_id, channel.guild_id)
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        source = self.channels[channel.parent_id] if channel.is_thread and channel.parent_id else channel
        overwrites = {(o.type, o.id): o for o in source.overwrites}
        everyone = overwrites.get((0, channel.guild_id))
        if everyone:
            perms = (perms & ~everyone.deny) | everyone.allow
        member = self.guilds[channel.guild_id].members[user_id]
        allow = deny = 0
        for role_id in member.roles:
            o = overwrites.get((0, role_id))
            if o:
                allow |= o.allow
                deny |= o.deny
        perms = (perms & ~deny) | allow
        own = overwrites.get((1, user_id))
        if own:
            perms = (perms & ~own.deny) | own.allow
        if not perms & VIEW_CHANNEL:
            return 0
        return perms

    def can_send(self, user_id: int, channel: Channel) -> bool:
        perms = self.permissions_in(user_id, channel)
        needed = SEND_MESSAGES_IN_THREADS if channel.is_thread else SEND_MESSAGES
        return bool(perms & VIEW_CHANNEL) and bool(perms & needed)

    # ----- payloads ----------------------------------------------------------------------------

    def guild_payload(self, guild_id: int | None = None) -> dict[str, Any]:
        guild = self.guilds[self.guild_id if guild_id is None else guild_id]
        general = next(c for c in self.channels.values() if c.guild_id == guild.id and c.type == GUILD_TEXT)
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "system_channel_id": str(general.id),
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "vanity_url_code": None,
            "application_id": None,
            "features": [],
            "roles": [r.payload() for r in self.roles.values() if r.id in self.guild_role_ids(guild.id)],
            "emojis": [],
            "stickers": [],
            "joined_at": guild.members[self.bot_user.id].joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(guild.members),
            # Without the members intent Discord sends only the bot's own member (and voice members).
            "members": [guild.members[self.bot_user.id].payload()],
            "voice_states": [],
            "presences": [],
            "channels": [c.payload() for c in self.channels.values() if c.guild_id == guild.id and not c.is_thread],
            "threads": [c.payload() for c in self.channels.values() if c.guild_id == guild.id and c.is_thread],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def mentions_in(self, content: str, channel: Channel) -> tuple[list[dict[str, Any]], list[str]]:
        """The `mentions` and `mention_roles` Discord derives from message content."""
        users: list[dict[str, Any]] = []
        seen: set[int] = set()
        for match in _USER_MENTION.finditer(content):
            uid = int(match.group(1))
            if uid in seen or uid not in self.users:
                continue
            seen.add(uid)
            data = self.users[uid].payload()
            members = self.guild_members(channel.guild_id)
            if uid in members:
                data["member"] = members[uid].payload(with_user=False)
            users.append(data)
        roles: list[str] = []
        if channel.guild_id is not None:
            for match in _ROLE_MENTION.finditer(content):
                rid = int(match.group(1))
                if rid in self.guild_role_ids(channel.guild_id) and str(rid) not in roles:
                    roles.append(str(rid))
        return users, roles

    def message_payload(
        self,
        channel: Channel,
        author: User,
        content: str,
        *,
        message_id: int | None = None,
        type: int = 0,
        reference: dict[str, Any] | None = None,
        webhook_id: int | None = None,
        flags: int = 0,
        attachments: list[dict[str, Any]] | None = None,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        users, roles = self.mentions_in(content, channel)
        everyone = ("@everyone" in content or "@here" in content) and (
            channel.guild_id is None or bool(self.permissions_in(author.id, channel) & MENTION_EVERYONE)
        )
        data: dict[str, Any] = {
            "id": str(message_id or self.ids.next()),
            "channel_id": str(channel.id),
            "author": author.payload(),
            "content": content,
            "timestamp": iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": everyone,
            "mentions": users,
            "mention_roles": roles,
            "attachments": attachments or [],
            "embeds": [],
            "reactions": [],
            "pinned": False,
            "type": type,
            "flags": flags,
            "components": [],
        }
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
            members = self.guild_members(channel.guild_id)
            if webhook_id is None and author.id in members:
                data["member"] = members[author.id].payload(with_user=False)
        if webhook_id is not None:
            data["webhook_id"] = str(webhook_id)
        if nonce is not None:
            data["nonce"] = nonce
        if reference is not None:
            data["message_reference"] = reference
            # Discord sends the replied-to message along (null once it was deleted), one level deep.
            referenced = channel.messages.get(int(reference["message_id"]))
            if referenced is not None:
                referenced = {k: v for k, v in referenced.items() if k != "referenced_message"}
            data["referenced_message"] = referenced
        return data
