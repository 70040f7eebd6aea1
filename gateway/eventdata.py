"""The one rule for event data: it must be text every transport can carry.

Each transport writes data as UTF-8 (SSE lines, WebSocket text frames, poll JSON with
ensure_ascii off, Redis). A Python str can hold what UTF-8 cannot: lone surrogates such as the
JSON escape "\\ud800". One such event would break every reader of its channel (streams end,
polls answer 500), so it is refused where every event enters: Hub.publish.
"""

from __future__ import annotations

from gateway.errors import BadRequest

__all__ = ["InvalidData", "check_data"]


class InvalidData(BadRequest):
    """Event data that cannot be written as UTF-8. Sources catch it to skip one upstream event."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_data", detail, 400)


def check_data(text: str) -> str:
    """`text` unchanged, or InvalidData (400 `invalid_data`) naming where the bad character is."""
    if text.isascii():  # the common case, and the cheapest test
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidData(
            f"the data holds a lone surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), "
            "which is not Unicode text and cannot be sent as UTF-8; send whole characters "
            "(a JSON surrogate escape needs its pair, e.g. \\ud83d\\ude00)"
        ) from None
    return text
