"""Validation of channel and event names (the contract's rules), shared by every route."""

from __future__ import annotations

import re

from gateway.errors import BadRequest

__all__ = ["check_channel", "check_event_name", "RESERVED_EVENTS"]

_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# No control characters (they would split an SSE line) and no lone surrogates (not UTF-8).
_EVENT = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,128}")
# Names the gateway itself sends; a publisher may not forge them.
RESERVED_EVENTS = frozenset({"gap", "error"})


def check_channel(name: str) -> str:
    if not _CHANNEL.fullmatch(name):
        raise BadRequest(
            "invalid_channel",
            f"{name[:140]!r} is not a valid channel name: use 1-128 characters of A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit",
        )
    return name


def check_event_name(name: str) -> str:
    if not _EVENT.fullmatch(name):
        raise BadRequest(
            "invalid_event", "the event name must be 1-128 characters with no control characters or lone surrogates"
        )
    if name != name.strip():
        # Some clients trim field values: "gap " would read as the gateway's own "gap" there.
        raise BadRequest("invalid_event", "the event name must not start or end with whitespace")
    if name in RESERVED_EVENTS:
        raise BadRequest("reserved_event", f"the event name {name!r} is reserved for the gateway's own signals")
    return name
