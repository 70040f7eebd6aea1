"""Event ids: "<milliseconds>-<sequence>", ordered per channel and opaque to clients.

The clock part keeps ids growing across restarts; the sequence orders events published within
the same millisecond. "0-0" is the cursor of a channel that has never had an event.
"""

from __future__ import annotations

import re

from gateway.errors import BadRequest

__all__ = ["ZERO", "Key", "parse", "format_id", "next_key"]

Key = tuple[int, int]
ZERO = "0-0"
_ID = re.compile(r"([0-9]{1,16})-([0-9]{1,10})")  # ASCII only: \d also matches other scripts' digits


def parse(text: str) -> Key:
    """Parse a client's cursor, or raise BadRequest (-> 400) when it is not one of our ids."""
    match = _ID.fullmatch(text)
    if not match:
        raise BadRequest(
            "invalid_since",
            f"{text[:64]!r} is not an event id of this gateway; "
            "pass back an id or cursor it gave you, or omit since to start from now",
        )
    return int(match[1]), int(match[2])


def format_id(key: Key) -> str:
    return f"{key[0]}-{key[1]}"


def next_key(last: Key, now_ms: int) -> Key:
    """The id after `last`: the clock when it has moved on, else the same millisecond + 1."""
    if now_ms > last[0]:
        return now_ms, 0
    return last[0], last[1] + 1
