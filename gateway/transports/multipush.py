"""The fast path for a connection that follows several channels (see push.py for one).

The connection attaches one small view per channel to the hub, so a publish on one channel
touches only that channel's subscribers: no connection scans its other channels. The hub still
encodes each event once per wire format (the multi-channel part: the event with its channel
envelope); each connection adds only its own cursor, which names every channel's position.
Whatever cannot be pushed at once (busy, behind, a gap) is read from history by that channel's
cursor, channel by channel, only for channels that were woken.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from gateway import cursor as cursors
from gateway.hub import Event, Hub, gap_event
from gateway.transports.push import Rounds, SlowConsumer, SocketStream, chunk, slices

__all__ = ["MultiPusher"]

Parts = list[tuple[str, bytes]]  # (the event's cursor entry, the event's shared part)


class _Batch(list):
    """One flush's parts for one wire format, shared by every view of that format, with the
    bytes already composed for each cursor seen so far: up-to-date connections on the same
    channels have equal cursors, so one of them composes and the rest reuse its bytes."""

    __slots__ = ("composed",)

    def __init__(self, parts: Parts) -> None:
        super().__init__(parts)
        self.composed: dict[str, tuple[bytes, str]] = {}  # cursor before -> (bytes, cursor after)


class _View:
    """What the hub sees of one channel of a multi-channel connection (the Pusher protocol)."""

    __slots__ = ("parent", "channel", "cursor", "kind", "hold")

    def __init__(self, parent: MultiPusher, channel: str, cursor: str) -> None:
        self.parent = parent
        self.channel = channel
        self.cursor = cursor
        self.kind = parent.kind
        self.hold = parent.hold  # a copy the parent keeps in step: the hub reads it per delivery

    def encode(self, events: list[Event]) -> _Batch:
        base, channel = self.parent.base, self.channel
        return _Batch([(e.cursor_entry(channel), e.multi_part(channel, base)) for e in events])

    def push(self, parts: _Batch, cursor: str, events: int = 1) -> None:
        """The parent's part of a delivery, done here: one frame per subscriber on the hub's hot
        loop (a partial or a call on to the parent measured ~0.3 µs more per delivery)."""
        self.cursor = cursor
        parent = self.parent
        parent.events_sent += events
        before = parent._text or parent.cursor()
        done = parts.composed.get(before)
        if done is None:
            data = parent._compose(self.channel, parts)
            parts.composed[before] = (data, parent.cursor())
        else:
            data, after = done
            parent._text = after  # the entries follow from it when next needed (not on this hot path)
            parent._stale = True
        parent._send_now(data)

    def lag(self, nbytes: int) -> None:
        self.parent.lag(nbytes)

    def wake(self) -> None:
        self.parent.wake_channel(self.channel)


class MultiPusher(SocketStream):
    __slots__ = (
        "base",
        "kind",
        "chunked",
        "_entries",
        "_text",
        "_stale",
        "_hold",
        "views",
        "_dirty",
        "_hub",
        "__weakref__",
    )

    def __init__(
        self,
        sock: Any,
        base: str,
        positions: dict[str, str],
        chunked: bool = False,
        event_class: Callable[[], Any] = threading.Event,
        lock_class: Callable[[], Any] = threading.Lock,
    ) -> None:
        super().__init__(sock, event_class, lock_class)
        self.base = base  # "sse" | "ws"
        # Interned: the hub's hot loop tells kinds apart by identity (one lookup per run of a kind).
        self.kind = sys.intern(base + "-multi" + ("-chunked" if chunked else ""))
        self.chunked = chunked
        self._entries: dict[str, str] = {c: cursors.entry(c, pos) for c, pos in positions.items()}
        self._text: str | None = None  # the joined cursor, kept while _entries do not change
        self._stale = False  # _text is ahead of _entries (a push moved it; see _current_entries)
        self._hold = 0 if self._raw is not None else 1
        self.views: dict[str, _View] = {c: _View(self, c, pos) for c, pos in positions.items()}
        self._dirty: set[str] = set(positions)  # channels to read from history on the next round
        self._hub: Hub | None = None

    @property
    def hold(self) -> int:
        """Above 0 while the publisher must not write (as Pusher.hold), mirrored on every view."""
        return self._hold

    @hold.setter
    def hold(self, value: int) -> None:
        self._hold = value
        for view in self.views.values():
            view.hold = value

    # -- the cursor ------------------------------------------------------------------------------
    def cursor(self) -> str:
        text = self._text
        if text is None:
            text = self._text = cursors.join(self._entries.values())
        return text

    def _current_entries(self) -> dict[str, str]:
        """Every channel's cursor entry, brought up to date with the text a push left: a push
        only swaps the joined text, whose entries are in the dict's order."""
        if self._stale:
            body = (self._text or "")[len(cursors.MULTI_PREFIX) :]
            self._entries = dict(zip(self._entries, body.split("~") if body else (), strict=True))
            self._stale = False
        return self._entries

    def _set_entry(self, channel: str, entry: str) -> None:
        self._current_entries()[channel] = entry
        self._text = None

    def _compose(self, channel: str, parts: Parts) -> bytes:
        """The bytes for these events of `channel`, each followed by the cursor after it."""
        entries = self._current_entries()
        out = []
        text = ""
        for entry, part in parts:
            entries[channel] = entry
            text = cursors.join(entries.values())
            cur = text.encode()
            if self.base == "sse":
                out.append(part + b"id: " + cur + b"\n\n")
            else:
                payload = part + b',"cursor":"' + cur + b'"}'
                out.append(_ws_text_frame(payload))
        if parts:
            self._text = text
        data = b"".join(out)
        return chunk(data) if self.chunked else data

    # -- called by the hub (through the views); never blocks --------------------------------------
    def wake_channel(self, channel: str) -> None:
        self._dirty.add(channel)
        self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    # -- called from the connection's own greenlet ------------------------------------------------
    def add(self, channel: str, position: str) -> None:
        if channel in self.views:
            return
        view = self.views[channel] = _View(self, channel, position)
        self._set_entry(channel, cursors.entry(channel, position))
        if self._hub is not None:
            self._hub.attach(channel, view)
        self.wake_channel(channel)

    def remove(self, channel: str) -> None:
        view = self.views.pop(channel, None)
        self._current_entries().pop(channel, None)
        self._text = None
        self._dirty.discard(channel)
        if view is not None and self._hub is not None:
            self._hub.detach(channel, view)

    def rounds(
        self,
        hub: Hub,
        limit: int,
        idle_s: Callable[[], float],
        on_idle: Callable[[], None],
        alive: Callable[[], bool] = lambda: True,
        on_wake: Callable[[], None] | None = None,
    ) -> Rounds[None]:
        """As Pusher.rounds, over every channel."""
        self._hub = hub
        for channel, view in self.views.items():
            hub.attach(channel, view)
        try:
            while not hub.closing and not self.dead and alive():
                self._wakeup.clear()
                self._catch_up(hub, limit)
                if hub.closing or self.dead:
                    break
                if on_wake is not None:
                    on_wake()
                if self._dirty:
                    continue
                woken = yield self._wakeup, idle_s()
                if not woken and alive():
                    self._idle(on_idle)
        finally:
            for channel, view in list(self.views.items()):
                hub.detach(channel, view)
            self._hub = None
        if not self.dead:
            self._write_backlog()  # a push's unsent rest goes before the stream's last words

    def _catch_up(self, hub: Hub, limit: int) -> None:
        self.hold += 1
        try:
            self._write_backlog()
            while self._dirty and not self.dead:
                if self.slow:
                    raise SlowConsumer()
                channel = self._dirty.pop()
                view = self.views.get(channel)
                if view is None:
                    continue
                start = view.cursor
                batch = hub.read(channel, start, limit)
                events = [gap_event(batch, start), *batch.events] if batch.gap else batch.events
                for group in slices(events):
                    parts = [(e.cursor_entry(channel), e.multi_part(channel, self.base)) for e in group]
                    self._write_history(hub, group, self._compose(channel, parts))
                view.cursor = batch.cursor
                self._set_entry(channel, cursors.entry(channel, batch.cursor))
                if batch.more:
                    self._dirty.add(channel)
            if not self._dirty:
                self.behind = 0  # up to date on every channel
        finally:
            self.hold -= 1


def _ws_text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload
