"""In-process channel store: bounded history per channel (by count, bytes and age), ids that grow.

This is the default backend, and the one tests use. All methods run without blocking, so a
publish never waits on anything but a little CPU.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, KeysView

from gateway.config import HistoryConfig
from gateway.hub.events import Batch, Event
from gateway.ids import ZERO, Key, format_id, next_key, parse

__all__ = ["MemoryStore"]


MAX_IDEMPOTENCY_KEYS = 10_000  # per channel; the oldest are forgotten first
EVENT_OVERHEAD = 200  # bytes an event costs beyond its data and name (the object, its id, links)


def event_cost(event: str, data: str) -> int:
    """What one event counts against history.max_bytes: its UTF-8 size plus a fixed overhead."""
    size = len(data) if data.isascii() else len(data.encode("utf-8"))
    return size + len(event) + EVENT_OVERHEAD


class _Channel:
    __slots__ = ("history", "costs", "bytes", "last", "last_key", "keys")

    def __init__(self) -> None:
        self.history: deque[Event] = deque()
        self.costs: deque[int] = deque()  # event_cost of each event in history, in step with it
        self.bytes = 0  # their sum
        self.last = ZERO
        self.last_key: Key = (0, 0)
        self.keys: OrderedDict[str, Event] = OrderedDict()  # idempotency key -> first event


class MemoryStore:
    def __init__(
        self,
        size: int,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
        max_bytes: int = HistoryConfig.max_bytes,
    ) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._clock = clock
        self._channels: dict[str, _Channel] = {}

    def append(self, channel: str, event: str, data: str, idempotency_key: str | None = None) -> Event:
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel()
        now = self._clock()
        if idempotency_key is not None:
            first = self._first_with_key(ch, idempotency_key, now)
            if first is not None:
                return first
        key = next_key(ch.last_key, int(now * 1000))
        ev = Event(format_id(key), event, data, key, ch.last, now)
        cost = event_cost(event, data)
        ch.history.append(ev)
        ch.costs.append(cost)
        ch.bytes += cost
        # Oldest first out past either bound; the newest is always kept, however big, so that
        # every reader can get it. A reader behind what was dropped is told (gap).
        while len(ch.history) > 1 and (len(ch.history) > self._size or ch.bytes > self._max_bytes):
            self._drop_oldest(ch)
        ch.last, ch.last_key = ev.id, key
        if idempotency_key is not None:
            # Only what a repeat answers with (its id), not the data: the keys outlive history
            # (max_age_s), and must not hold what history.max_bytes has let go.
            ch.keys[idempotency_key] = Event(ev.id, ev.event, "", ev.key, ev.prev, ev.time)
            if len(ch.keys) > MAX_IDEMPOTENCY_KEYS:
                ch.keys.popitem(last=False)
        return ev

    def _first_with_key(self, ch: _Channel, idempotency_key: str, now: float) -> Event | None:
        """The event first published with this key within max_age_s, as a repeat (see Store)."""
        cutoff = now - self._max_age_s
        while ch.keys:  # forget keys older than the history's age (oldest first)
            oldest = next(iter(ch.keys.values()))
            if oldest.time >= cutoff:
                break
            ch.keys.popitem(last=False)
        first = ch.keys.get(idempotency_key)
        if first is None:
            return None
        repeat = Event(first.id, first.event, first.data, first.key, first.prev, first.time)  # data: "" (see append)
        repeat.repeat = True
        return repeat

    def read(self, channel: str, since: str | None, limit: int) -> Batch:
        ch = self._channels.get(channel)
        if ch is not None and (since is None or since == ch.last):
            return Batch([], ch.last)  # the common answer: a reader at the tail
        key = parse(since) if since is not None else None
        if ch is None:
            return Batch([], ZERO, gap=since not in (None, ZERO))
        self._expire(ch)
        history = ch.history
        # Readers are nearly always at the tail: walk back from the newest event.
        start = len(history)
        while start and history[start - 1].key > key:
            start -= 1
        if start:
            known = history[start - 1].id == since
        else:
            known = bool(history) and history[0].prev == since
        # Indexing a deque near its end is cheap; islice would walk it from the oldest event.
        stop = min(start + limit, len(history))
        events = [history[i] for i in range(start, stop)]
        more = stop < len(history)
        cursor = events[-1].id if events else ch.last
        return Batch(events, cursor, gap=not known, more=more)

    def last_id(self, channel: str) -> str:
        ch = self._channels.get(channel)
        return ch.last if ch else ZERO

    def channels(self) -> list[str]:
        return list(self._channels)

    def local_channels(self) -> KeysView[str]:
        """The channels held in this process (a live view, not a copy)."""
        return self._channels.keys()

    def sweep(self, busy: Callable[[str], bool]) -> int:
        """Expire old events; free channels with no history that nobody is using."""
        freed = 0
        for name, ch in list(self._channels.items()):
            self._expire(ch)
            if not ch.history and not busy(name):
                del self._channels[name]
                freed += 1
        return freed

    def close(self) -> None:
        pass

    def _expire(self, ch: _Channel) -> None:
        cutoff = self._clock() - self._max_age_s
        history = ch.history
        while history and history[0].time < cutoff:
            self._drop_oldest(ch)

    @staticmethod
    def _drop_oldest(ch: _Channel) -> None:
        ch.history.popleft()
        ch.bytes -= ch.costs.popleft()
