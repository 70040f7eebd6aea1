"""An event, and a batch of events read from a channel; each event encodes itself once per wire
format, so fan-out to thousands of subscribers reuses the same bytes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.cursor import entry as cursor_entry
from gateway.ids import Key

__all__ = ["Event", "Batch", "gap_event"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class Event:
    __slots__ = ("id", "event", "data", "key", "prev", "time", "repeat", "channel", "_json", "_sse", "_ws", "_multi")

    def __init__(self, id: str, event: str, data: str, key: Key, prev: str, time: float) -> None:
        self.id = id
        self.event = event
        self.data = data
        self.key = key  # the parsed id, for ordering
        self.prev = prev  # id of the event before this one on its channel
        self.time = time  # wall clock at publish
        # A store returns the first event again, marked so, for a repeated Idempotency-Key.
        self.repeat = False
        self.channel = ""  # set by multi-channel readers that need it
        # Multi-channel encodings (see multi_part, cursor_entry), made once per event and channel.
        self._multi: dict[str, Any] | None = None
        self._json: str | None = None
        self._sse: bytes | None = None
        self._ws: bytes | None = None

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "event": self.event, "data": self.data}

    @property
    def json(self) -> str:
        """The event as a JSON object: a WebSocket frame, an item of a poll response."""
        if self._json is None:
            self._json = json.dumps(self.to_dict(), ensure_ascii=False)
        return self._json

    @property
    def sse(self) -> bytes:
        """The event as an SSE block; multi-line data goes out as several data: lines."""
        if self._sse is None:
            lines = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(self.data))
            id_line = f"id: {self.id}\n" if self.id else ""
            self._sse = f"{id_line}event: {self.event}\n{lines}\n".encode()
        return self._sse

    @property
    def ws(self) -> bytes:
        """The event as one whole WebSocket text frame (server to client: unmasked)."""
        if self._ws is None:
            payload = self.json.encode()
            n = len(payload)
            if n < 126:
                head = bytes((0x81, n))
            elif n < 65536:
                head = bytes((0x81, 126)) + n.to_bytes(2, "big")
            else:
                head = bytes((0x81, 127)) + n.to_bytes(8, "big")
            self._ws = head + payload
        return self._ws

    def cursor_entry(self, channel: str) -> str:
        """This event's position in a multi-channel cursor (the same for every connection)."""
        cache = self._multi
        if cache is None:
            cache = self._multi = {}
        key = "\x00" + channel  # no channel name holds NUL: apart from multi_part's keys
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = cursor_entry(channel, self.id)
        return entry

    def multi_part(self, channel: str, kind: str) -> bytes:
        """This event's shared part on a multi-channel connection (the per-connection cursor
        follows it): SSE `event:` and `data:` lines with the channel envelope, or the start of a
        WebSocket frame's JSON without its closing cursor field."""
        cache = self._multi
        if cache is None:
            cache = self._multi = {}
        key = kind + channel
        part = cache.get(key)
        if part is None:
            if kind == "sse":
                envelope = json.dumps({"channel": channel, "id": self.id, "data": self.data}, ensure_ascii=False)
                part = f"event: {self.event}\ndata: {envelope}\n".encode()
            else:
                body = json.dumps(
                    {"channel": channel, "id": self.id, "event": self.event, "data": self.data}, ensure_ascii=False
                )
                part = body[:-1].encode()  # without "}": the cursor field closes it
            cache[key] = part
        return part

    def __repr__(self) -> str:
        return f"Event({self.id!r}, {self.event!r}, {self.data[:40]!r})"


@dataclass
class Batch:
    """What a reader gets: events after its cursor (oldest first), its next cursor, and whether
    events were lost between its cursor and the first one here (gap)."""

    events: list[Event] = field(default_factory=list)
    cursor: str = "0-0"
    gap: bool = False
    more: bool = False  # more events wait beyond this batch's limit
    _poll_body: bytes | None = field(default=None, init=False, repr=False, compare=False)  # made once: shared

    def poll_body(self) -> bytes:
        """The poll answer's JSON, encoded once however many polls share this batch."""
        if self._poll_body is None:
            self._poll_body = self._poll_json().encode()
        return self._poll_body

    def _poll_json(self) -> str:
        events = ",".join(e.json for e in self.events)
        gap = "true" if self.gap else "false"
        more = "true" if self.more else "false"
        return f'{{"events":[{events}],"cursor":{json.dumps(self.cursor)},"gap":{gap},"more":{more}}}'

    def resync_id(self) -> str:
        """The cursor from which this batch continues: where a gap event points the client."""
        return self.events[0].prev if self.events else self.cursor


def gap_event(batch: Batch, requested: str) -> Event:
    """The `gap` event streams send before the next real event when history was lost."""
    data = json.dumps({"requested": requested, "resumed_from": batch.resync_id()})
    return Event(batch.resync_id(), "gap", data, (0, 0), "", 0.0)
