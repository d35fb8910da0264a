"""What Discord refuses, and whom it notifies: the checks the fake's REST API applies to the bot's messages
and command definitions (as Discord's status codes and error JSON), and who a message the bot posts would
ping. Pure functions over payloads; the REST handlers in `rest.py` call them."""

from __future__ import annotations

import re
from typing import Any

from tests.fake_discord.world import MENTION_EVERYONE, Channel, World

MESSAGE_LIMIT = 2000
NITRO_MESSAGE_LIMIT = 4000  # what a Nitro subscriber may post (bots stay at 2000)
_COMMAND_NAME = re.compile(r"^[-_a-z0-9]{1,32}$")


class DiscordError(Exception):
    """An error answer: HTTP status plus Discord's `{"code", "message", "errors"}` body."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message, "code": code}
        if errors is not None:
            self.body["errors"] = errors


def form_error(path: str, code: str, message: str) -> DiscordError:
    """Discord's 400 `Invalid Form Body` (50035) with the nested `_errors` shape."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        errors = {part: errors}
    return DiscordError(400, 50035, "Invalid Form Body", errors)


def validate_content(body: dict[str, Any], prefix: str = "") -> None:
    """A message body's content and allowed_mentions, as Discord checks them for a post or an edit."""
    content = body.get("content")
    if content is not None and not isinstance(content, str):
        raise form_error(prefix + "content", "STRING_TYPE_CONVERT", "Could not interpret value as string.")
    if len(content or "") > MESSAGE_LIMIT:
        raise form_error(prefix + "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MESSAGE_LIMIT} or fewer in length.")
    if not (content or "").strip() and not any(
        body.get(k) for k in ("embeds", "attachments", "sticker_ids", "components", "poll")
    ):
        raise DiscordError(400, 50006, "Cannot send an empty message")
    allowed = body.get("allowed_mentions")
    if allowed is not None:
        parse = allowed.get("parse", [])
        if any(p not in ("users", "roles", "everyone") for p in parse):
            raise form_error(prefix + "allowed_mentions.parse", "BASE_TYPE_CHOICES", "Value must be one of.")
        for kind in ("users", "roles"):
            if kind in parse and allowed.get(kind):
                raise form_error(
                    prefix + "allowed_mentions",
                    "MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                    f'parse:["{kind}"] and {kind}: [ids] are mutually exclusive.',
                )


def validate_components(body: dict[str, Any], prefix: str = "") -> None:
    """A message's `components`, as Discord checks them: at most 5 action rows (type 1) of at most 5
    buttons (type 2) each; a button has a style of 1 to 5, a label of at most 80 characters, and
    (except a link button, style 5, which has a url instead) a custom_id of 1 to 100 characters,
    unique within the message."""
    components = body.get("components")
    if components is None:
        return
    at = prefix + "components"
    if not isinstance(components, list) or len(components) > 5:
        raise form_error(at, "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    seen: set[str] = set()
    for r, row in enumerate(components):
        if not isinstance(row, dict) or row.get("type") != 1:
            raise form_error(f"{at}.{r}.type", "UNION_TYPE_CHOICES", 'Value of field "type" must be one of (1,).')
        items = row.get("components") or []
        if not 1 <= len(items) <= 5:
            raise form_error(f"{at}.{r}.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")
        for i, item in enumerate(items):
            where = f"{at}.{r}.components.{i}"
            if item.get("type") != 2:
                raise form_error(f"{where}.type", "UNION_TYPE_CHOICES", "This fake knows only buttons (type 2).")
            style = item.get("style")
            if style not in (1, 2, 3, 4, 5):
                raise form_error(f"{where}.style", "BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3, 4, 5}.")
            if len(item.get("label") or "") > 80:
                raise form_error(f"{where}.label", "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length.")
            if style == 5:
                if not item.get("url") or item.get("custom_id"):
                    raise form_error(where, "COMPONENT_INVALID_URL", "A link button has a url and no custom_id.")
                continue
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100:
                raise form_error(f"{where}.custom_id", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
            if custom_id in seen:
                raise form_error(
                    f"{where}.custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated"
                )
            seen.add(custom_id)


def validate_command(index: int, cmd: Any) -> None:
    """Command `index` of a bulk overwrite (`PUT .../commands`), as Discord checks a definition."""
    if not isinstance(cmd, dict) or not isinstance(cmd.get("name"), str):
        raise form_error(f"{index}.name", "BASE_TYPE_REQUIRED", "This field is required")
    if not _COMMAND_NAME.match(cmd["name"]):
        raise form_error(f"{index}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
    if cmd.get("type", 1) == 1 and not 1 <= len(cmd.get("description") or "") <= 100:
        raise form_error(f"{index}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
    dmp = cmd.get("default_member_permissions")
    # Discord takes an integer or a string of digits, and always answers with a string.
    whole_number = isinstance(dmp, int) and not isinstance(dmp, bool) and dmp >= 0
    if dmp is not None and not (whole_number or (isinstance(dmp, str) and dmp.isdigit())):
        raise form_error(f"{index}.default_member_permissions", "NUMBER_TYPE_COERCE", "Value is not int.")
    _validate_options(str(index), cmd.get("options") or [])


def _validate_options(at: str, options: list[Any]) -> None:
    """A command's options, and a subcommand's (type 1) or subcommand group's (type 2) in turn."""
    if len(options) > 25:
        raise form_error(f"{at}.options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    seen_optional = False
    nested = [o.get("type") in (1, 2) for o in options]
    if any(nested) and not all(nested):
        raise form_error(
            f"{at}.options",
            "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
            "Sub-command and sub-command group option types are mutually exclusive to all other types",
        )
    for o_index, option in enumerate(options):
        where = f"{at}.options.{o_index}"
        if option.get("type") in (1, 2):
            _validate_options(where, option.get("options") or [])
        if not _COMMAND_NAME.match(option.get("name", "")):
            raise form_error(f"{where}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        if not 1 <= len(option.get("description") or "") <= 100:
            raise form_error(f"{where}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        if option.get("required"):
            if seen_optional:
                raise form_error(
                    where,
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options",
                )
        else:
            seen_optional = True
        if len(option.get("choices") or []) > 25:
            raise form_error(f"{where}.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")


def pings(world: World, message: dict[str, Any], body: dict[str, Any], channel: Channel) -> dict[str, Any]:
    """Who Discord would notify for a message the bot posted with request `body`: users, roles, @everyone."""
    w = world
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
