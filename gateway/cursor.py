"""One cursor for many channels (contract "Many channels on one connection (v2)").

A single-channel connection's cursor is that channel's event id, as in v1. A multi-channel
cursor is `m~` followed by one entry per channel, `~`-separated: an 8-character digest of the
channel name (base64url) then its id as base36 `<ms>.<seq>`. About 20 ASCII characters a
channel, so 50 channels fit in a Last-Event-ID of ~1 KB; a digest rather than a position keeps
the cursor valid when channels are added or removed on a WebSocket.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping

from gateway.errors import BadRequest
from gateway.ids import format_id, parse

__all__ = ["MULTI_PREFIX", "encode", "decode", "is_multi", "channel_tag"]

MULTI_PREFIX = "m~"
_ENTRY = re.compile(r"([A-Za-z0-9_-]{8})([0-9a-z]{1,11})\.([0-9a-z]{1,7})")
_MAX_CHARS = 64 * 1024
_tags: dict[str, str] = {}


def channel_tag(channel: str) -> str:
    tag = _tags.get(channel)
    if tag is None:
        digest = hashlib.blake2b(channel.encode(), digest_size=6).digest()
        tag = base64.urlsafe_b64encode(digest).decode()
        if len(_tags) < 100_000:  # a cache, not a registry: bounded
            _tags[channel] = tag
    return tag


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def entry(channel: str, event_id: str) -> str:
    ms, seq = parse(event_id)
    return f"{channel_tag(channel)}{_b36(ms)}.{_b36(seq)}"


def encode(positions: Mapping[str, str]) -> str:
    """The multi-channel cursor for channel -> last id."""
    return MULTI_PREFIX + "~".join(entry(c, i) for c, i in positions.items())


def join(entries: Iterable[str]) -> str:
    return MULTI_PREFIX + "~".join(entries)


def is_multi(text: str) -> bool:
    return text.startswith(MULTI_PREFIX)


def decode(text: str, channels: Iterable[str]) -> dict[str, str | None]:
    """Where each of `channels` resumes: its id in the cursor, or None (from now) for a channel
    the cursor does not know. Raises 400 invalid_since for anything that is not our cursor."""
    channels = list(channels)
    if not is_multi(text):
        if len(channels) == 1:
            parse(text)  # a plain id: raises 400 when it is not one
            return {channels[0]: text}
        raise _invalid(text)
    if len(text) > _MAX_CHARS:
        raise _invalid(text)
    known: dict[str, str] = {}
    body = text[len(MULTI_PREFIX) :]
    for part in body.split("~") if body else ():
        match = _ENTRY.fullmatch(part)
        if match is None:
            raise _invalid(text)
        ms, seq = int(match[2], 36), int(match[3], 36)
        if ms >= 10**16 or seq >= 10**10:
            raise _invalid(text)
        known[match[1]] = format_id((ms, seq))
    return {c: known.get(channel_tag(c)) for c in channels}


def _invalid(text: str) -> BadRequest:
    return BadRequest(
        "invalid_since",
        f"{text[:64]!r} is not a cursor of this gateway for these channels; "
        "pass back a cursor it gave you, or omit since to start from now",
    )
