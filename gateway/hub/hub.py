"""The Hub: publish into a store, wake the readers of that channel, count who is listening.

Readers never get events pushed into per-subscriber queues. Each reader holds a cursor and,
when woken, reads everything after it from the channel's history in one batch. So a publish
costs the same whatever the readers do, a slow reader can never block the publisher or the
others, and a reader that fell behind the history is told so (gap) instead of losing events.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from gateway.hub.events import Batch, Event
from gateway.names import check_channel, check_event_name

__all__ = ["Hub", "Store"]

SWEEP_EVERY_S = 30.0


class Store(Protocol):
    """Where channels and their history live (memory.py, redis.py)."""

    def append(self, channel: str, event: str, data: str) -> Event: ...
    def read(self, channel: str, since: str | None, limit: int) -> Batch: ...
    def last_id(self, channel: str) -> str: ...
    def channels(self) -> list[str]: ...
    def sweep(self, busy: Callable[[str], bool]) -> int: ...
    def close(self) -> None: ...


Listener = Callable[[str, int], None]


class Hub:
    def __init__(self, store: Store, event_class: type = threading.Event) -> None:
        self.store = store
        self.closing = False
        self._event_class = event_class
        self._signals: dict[str, threading.Event] = {}
        self._subscribers: Counter[str] = Counter()
        self._listeners: list[Listener] = []
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        self.published = 0

    # -- writing -------------------------------------------------------------------------
    def publish(self, channel: str, data: str, event: str = "message") -> Event:
        check_channel(channel)
        check_event_name(event)
        ev = self.store.append(channel, event, data)
        self.published += 1
        self.notify(channel)
        self._maybe_sweep()
        return ev

    def notify(self, channel: str) -> None:
        """Wake every reader waiting on this channel (also called for events from other nodes)."""
        signal = self._signals.pop(channel, None)
        if signal is not None:
            signal.set()

    # -- reading -------------------------------------------------------------------------
    def read(self, channel: str, since: str | None, limit: int) -> Batch:
        return self.store.read(channel, since, limit)

    def last_id(self, channel: str) -> str:
        return self.store.last_id(channel)

    def wait(self, channel: str, since: str | None, timeout: float, limit: int) -> Batch:
        """Events after `since`, waiting up to `timeout` s for the first; returns early, with
        whatever there is, when a gap is found or the hub is closing."""
        deadline = time.monotonic() + timeout
        while True:
            # Take the signal before reading, so a publish in between still wakes us.
            signal = self._signals.get(channel)
            if signal is None:
                signal = self._signals[channel] = self._event_class()
            batch = self.store.read(channel, since, limit)
            remaining = deadline - time.monotonic()
            if batch.events or batch.gap or self.closing or remaining <= 0:
                return batch
            signal.wait(remaining)
            since = batch.cursor if since is None else since

    # -- who is listening ----------------------------------------------------------------
    @contextmanager
    def subscription(self, channel: str) -> Iterator[None]:
        """Count a streaming reader (SSE, WebSocket, a held long poll) for its lifetime."""
        self._subscribers[channel] += 1
        if self._subscribers[channel] == 1:
            self._tell(channel, 1)
        try:
            yield
        finally:
            self._subscribers[channel] -= 1
            if self._subscribers[channel] <= 0:
                del self._subscribers[channel]
                self._tell(channel, 0)

    def subscribers(self, channel: str | None = None) -> int:
        if channel is None:
            return sum(self._subscribers.values())
        return self._subscribers.get(channel, 0)

    def add_listener(self, listener: Listener) -> None:
        """listener(channel, n) is called when a channel gains its first subscriber (n=1) and
        loses its last (n=0): lazy upstream sources connect and disconnect on it."""
        self._listeners.append(listener)

    def channels(self) -> list[str]:
        return sorted(set(self.store.channels()) | set(self._subscribers))

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Shutting down: wake every reader so each can tell its client to come back."""
        self.closing = True
        for channel in list(self._signals):
            self.notify(channel)

    def _tell(self, channel: str, n: int) -> None:
        for listener in self._listeners:
            listener(channel, n)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY_S
            # Signals nobody holds a subscription for are dropped; setting them first makes any
            # waiter re-read and take a fresh one, so no wake-up is ever lost.
            for channel in [c for c in self._signals if c not in self._subscribers]:
                self.notify(channel)
            self.store.sweep(lambda name: name in self._subscribers)
