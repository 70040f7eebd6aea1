"""An incremental parser for the text/event-stream format (the WHATWG HTML "server-sent events"
rules): fields, multi-line data, comments, `retry:`, a leading BOM, CRLF / LF / CR line ends, and
chunks that split anywhere (even between CR and LF, or inside a UTF-8 character).

Memory is bounded: an event (or a single unterminated line) larger than `max_event_bytes` is
skipped up to its blank line and counted in `oversized`, never buffered whole.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEParser", "Message"]


@dataclass
class Message:
    data: str
    event: str  # "" when the block had no event: field
    id: str | None  # the block's own id: field, if it had one
    last_id: str  # the last event ID once this event fired (what a reconnect resumes from)


class SSEParser:
    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self.max_event_bytes = max_event_bytes
        self.last_id = ""  # the "last event ID buffer": persists across events
        self.dispatched_id = ""  # last_id as of the last blank line (a complete block)
        self.retry_ms: int | None = None
        self.oversized = 0
        self._buf = b""
        self._started = False  # the BOM may only come first
        self._after_cr = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._skip_line = False  # inside a line too long to keep
        self._reset_event()

    def _reset_event(self) -> None:
        self._data: list[str] = []
        self._size = 0
        self._event = ""
        self._id: str | None = None
        self._too_big = False

    def feed(self, chunk: bytes) -> list[Message]:
        """Parse a chunk; returns the events it completed, in order."""
        if not chunk:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        buf = self._buf + chunk
        if not self._started:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._buf = buf
                return []
            self._started = True
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        out: list[Message] = []
        start = 0
        n = len(buf)
        while start < n:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            end = min(ends)
            line = buf[start:end]
            if buf[end] == 13:  # CR: swallow a following LF, or remember to if the chunk ends here
                if end + 1 < n:
                    start = end + 2 if buf[end + 1] == 10 else end + 1
                else:
                    start = end + 1
                    self._after_cr = True
            else:
                start = end + 1
            if self._skip_line:
                self._skip_line = False  # the tail of an overlong line: its content is gone
                continue
            message = self._line(line)
            if message is not None:
                out.append(message)
        rest = buf[start:]
        if len(rest) > self.max_event_bytes:
            # One unterminated line over the limit: drop what we have and the rest of the line.
            self._too_big = True
            self._skip_line = True
            rest = b""
        elif self._skip_line:
            rest = b""
        self._buf = rest
        return out

    def _line(self, raw: bytes) -> Message | None:
        if not raw:
            return self._dispatch()
        if raw.startswith(b":"):
            return None  # a comment (heartbeats)
        line = raw.decode("utf-8", "replace")
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(raw) + 1
            if self._size > self.max_event_bytes:
                self._too_big = True
                self._data = []
            elif not self._too_big:
                self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
                self.last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None  # unknown fields are ignored, as the spec says

    def _dispatch(self) -> Message | None:
        data, event, own_id, too_big = self._data, self._event, self._id, self._too_big
        self._reset_event()
        self.dispatched_id = self.last_id
        if too_big:
            self.oversized += 1
            return None
        if not data:
            return None  # a block without data: fires nothing (an id: alone still moved last_id)
        return Message("\n".join(data), event, own_id, self.last_id)
