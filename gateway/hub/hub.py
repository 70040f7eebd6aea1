"""The Hub: publish into a store, wake the readers of that channel, count who is listening.

Readers never get events pushed into per-subscriber queues. Each reader holds a cursor and,
when woken, reads everything after it from the channel's history in one batch. So a publish
costs the same whatever the readers do, a slow reader can never block the publisher or the
others, and a reader that fell behind the history is told so (gap) instead of losing events.

The fast path for streams: a Pusher (SSE, WebSocket) attached to a channel is handed the
already-encoded bytes of new events right after they are published, and writes them to its
socket without blocking and without a greenlet switch. Events published close together are
flushed as one batch (one write per subscriber). A pusher that cannot take the bytes at once
(busy, behind, or its socket is full) is only woken, and catches up from history by cursor.
Events published on other nodes of a shared store take the same path (notified()): read once
from the store, then pushed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, KeysView
from contextlib import contextmanager
from typing import Protocol

from gateway.errors import GatewayError
from gateway.eventdata import check_data
from gateway.hub.events import Batch, Event
from gateway.names import check_channel, check_event_name

__all__ = ["Hub", "Store", "Pusher", "Observer", "WaitAbandoned"]

log = logging.getLogger("gateway.hub")

SWEEP_EVERY_S = 30.0
SHARED_READ_S = 1.0  # how long the polls woken by one event may share its read
SHARED_READS_KEPT = 10_000  # channels with a shared read at once (all dropped when full)
SHARED_READ_BYTES = 16 << 20  # and the event data they hold, at most
NOTIFIED_BATCH = 100  # other nodes' events pushed at once; more than this and streams read them


class WaitAbandoned(Exception):
    """Raised by a wait (hub.wait_on) whose reader is gone, e.g. its client hung up: the wait
    ends at once instead of at its timeout; the hub lets it through to the reader."""


class Store(Protocol):
    """Where channels and their history live (memory.py, redis.py)."""

    def append(self, channel: str, event: str, data: str, idempotency_key: str | None = None) -> Event:
        """Store one event. With an idempotency key already used on this channel within the
        history's age, store nothing and return the first event again with .repeat set."""
        ...

    def read(self, channel: str, since: str | None, limit: int) -> Batch: ...
    def last_id(self, channel: str) -> str: ...
    def channels(self) -> list[str]: ...
    # The channels whose history this process holds (a live view), or None for a shared store.
    def local_channels(self) -> KeysView[str] | None: ...
    def sweep(self, busy: Callable[[str], bool]) -> int: ...
    def close(self) -> None: ...


Listener = Callable[[str, int], None]


class Observer:
    """What the hub tells whoever counts (metrics): cheap calls from the hot path. This base
    class ignores everything; gateway/metrics.py overrides it."""

    def published(self, channel: str, event: Event) -> None:
        pass

    def delivered(self, kind: str, subscribers: int, events: list[Event], nbytes: int) -> None:
        """One fast-path flush: `events` written to `subscribers` sockets of wire format `kind`,
        `nbytes` in all (per subscriber: nbytes / subscribers)."""

    def caught_up(self, kind: str, events: int, nbytes: int) -> None:
        """A stream wrote `events` events read back from history (a resume, a gap, a busy moment)."""


class Pusher(Protocol):
    """A streaming subscriber that can take encoded events straight from the publisher."""

    kind: str  # the wire format: pushers of one kind share one encoding of each batch
    cursor: str  # id of the last event it has written (or will have, once its backlog is out)
    hold: int  # 0 when idle, with nothing of its own being written: push() may be called

    def encode(self, events: list[Event]) -> bytes: ...
    def push(self, data: bytes, cursor: str, events: int) -> None: ...  # never blocks
    def lag(self, nbytes: int) -> None: ...  # events it could not take at once (slow consumers)
    def wake(self) -> None: ...  # catch up from history by cursor


def _call_now(fn: Callable[[str], None], channel: str) -> None:
    fn(channel)


def _wait_on(signal: threading.Event, timeout: float) -> None:
    signal.wait(timeout)


class Hub:
    def __init__(self, store: Store, event_class: type = threading.Event) -> None:
        self.store = store
        self.closing = False
        self._event_class = event_class
        self._signals: dict[str, threading.Event] = {}  # one per channel, shared by its long polls
        self._waiting: Counter[str] = Counter()  # long polls waiting per channel
        self._extra: dict[str, set[threading.Event]] = {}  # multi-channel long polls' own events
        # The last batch a woken long poll read per channel, for the others woken with it: they
        # nearly all ask from the same cursor. Forgotten at the channel's next event.
        self._shared: dict[str, tuple[str | None, int, Batch, float, int]] = {}  # (..., expiry, bytes)
        self._shared_bytes = 0
        self._next_shared_sweep = 0.0
        self._wakes = 0
        self._subscribers: Counter[str] = Counter()
        self._listeners: list[Listener] = []
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        self.published = 0
        self._pushers: dict[str, dict[Pusher, None]] = {}  # insertion-ordered sets
        self._pending: dict[str, list[Event]] = {}
        # How a flush is scheduled: at once by default; the server passes gevent's "after the
        # current greenlet yields" so events published in one go share one write per subscriber.
        self.defer: Callable[[Callable[[str], None], str], None] = _call_now
        # How a long poll waits for its signal, up to a timeout: the server passes one that
        # keeps a timer per wait out of it (gateway/server.py's _CoarseDeadlines).
        self.wait_on: Callable[[threading.Event, float], None] = _wait_on
        self.observer = Observer()
        # How other nodes' events are pushed apart from the listener (notified()): the server
        # passes gevent's spawn, where that greenlet and the publishers never run at once; None
        # (threads) only wakes the streams.
        self.spawn: Callable[[Callable[[], None]], object] | None = None
        self._notified: dict[str, None] = {}  # channels marked by the listener, in order
        self._pushing_notified = False

    # -- writing -------------------------------------------------------------------------
    def publish(self, channel: str, data: str, event: str = "message", *, idempotency_key: str | None = None) -> Event:
        check_channel(channel)
        check_event_name(event)
        check_data(data)
        ev = self.store.append(channel, event, data, idempotency_key)
        if ev.repeat:  # stored before: nothing new to hand anyone
            return ev
        self.published += 1
        self.observer.published(channel, ev)
        if channel in self._pushers:
            pending = self._pending.get(channel)
            if pending is None:
                self._pending[channel] = [ev]
                self.defer(self._flush, channel)
            else:
                pending.append(ev)
        self._wake_waiters(channel)
        self._maybe_sweep()
        return ev

    def notify(self, channel: str) -> None:
        """Wake every reader of this channel: they read by cursor (see notified() for other
        nodes' events)."""
        self._wake_waiters(channel)
        self._wake_pushers(channel)

    def _wake_waiters(self, channel: str) -> None:
        self._wakes += 1
        self._drop_shared(channel)
        signal = self._signals.pop(channel, None)
        if signal is not None:
            signal.set()
        extra = self._extra.get(channel)
        if extra:
            for woken in list(extra):
                woken.set()

    # -- the fast path for streams ---------------------------------------------------------
    def attach(self, channel: str, pusher: Pusher) -> None:
        """Hand this pusher every event published here from now on (see the module doc)."""
        self._pushers.setdefault(channel, {})[pusher] = None

    def detach(self, channel: str, pusher: Pusher) -> None:
        pushers = self._pushers.get(channel)
        if pushers is not None:
            pushers.pop(pusher, None)
            if not pushers:
                del self._pushers[channel]

    def notified(self, channel: str) -> None:
        """Another node published here (a shared store's listener calls this). The long polls
        are woken at once. With `spawn` set, the new events are then read once and pushed to
        the streams up to date as this node's own publishes are (encoded once per wire format,
        written without waking each stream), and only the others are woken to read by cursor.
        That happens apart from the listener (which only marks the channel), one channel at a
        time, so a burst of notifications for a channel costs one read and a slow read delays
        no other notification."""
        if self.spawn is None or channel not in self._pushers or self.closing:
            self.notify(channel)
            return
        self._wake_waiters(channel)
        self._notified[channel] = None
        if not self._pushing_notified:
            self._pushing_notified = True
            self.spawn(self._push_notified)

    def _push_notified(self) -> None:
        try:
            while self._notified and not self.closing:
                channel = next(iter(self._notified))
                del self._notified[channel]
                try:
                    self._push_from_store(channel)
                except Exception:  # a bad entry, a bug: that channel's streams read for themselves
                    log.exception("pushing other nodes' events of %r failed; its streams catch up", channel)
                    self._wake_pushers(channel)
        finally:
            self._pushing_notified = False
        for channel in list(self._notified):  # marked while closing: just woken
            del self._notified[channel]
            self._wake_pushers(channel)

    def _push_from_store(self, channel: str) -> None:
        pushers = self._pushers.get(channel)
        if not pushers:
            return
        idle = Counter(p.cursor for p in pushers if not p.hold)
        if not idle:
            self._wake_pushers(channel)
            return
        since = idle.most_common(1)[0][0]
        try:
            batch = self.store.read(channel, since, NOTIFIED_BATCH)
        except GatewayError:  # the store is in trouble: each stream meets it on its own read
            self._wake_pushers(channel)
            return
        if batch.gap or batch.more:
            self._wake_pushers(channel)
        elif batch.events:
            self._push(channel, batch.events)
        else:  # nothing new for those at `since` (a repeat notification): wake only the others
            self._wake_pushers(channel, unless_at=since)

    def _wake_pushers(self, channel: str, unless_at: str | None = None) -> None:
        for pusher in list(self._pushers.get(channel, ())):
            if unless_at is None or pusher.hold or pusher.cursor != unless_at:
                pusher.wake()

    def _flush(self, channel: str) -> None:
        events = self._pending.pop(channel, None)
        if events:
            self._push(channel, events)

    def _push(self, channel: str, events: list[Event]) -> None:
        """Hand these new events of `channel` to its pushers: bytes to each one whose cursor is
        where they begin, a wake-up (and the debt, for the slow-consumer cut) to the others."""
        pushers = self._pushers.get(channel)
        if not pushers:
            return
        first, last = events[0].prev, events[-1].id
        # Only a run of consecutive events can be appended to a cursor (a backend that appends
        # concurrently may finish out of order): otherwise everyone reads from history.
        if not all(events[i].prev == events[i - 1].id for i in range(1, len(events))):
            first = None
        encoded: dict[str, bytes] = {}
        counts: dict[str, int] = {}
        kind, data, run = None, b"", 0  # run: pushes of `kind` not yet added to counts
        n_events = len(events)
        cost = -1
        # The hot loop: one non-blocking send per subscriber, nothing else that costs. Kinds are
        # told apart by identity (each is one interned string), so a run of one kind costs no lookup.
        for pusher in list(pushers):
            if pusher.cursor == first and not pusher.hold:
                if pusher.kind is not kind:
                    if run:
                        counts[kind] = counts.get(kind, 0) + run
                    kind, run = pusher.kind, 0
                    data = encoded.get(kind) or encoded.setdefault(kind, pusher.encode(events))
                pusher.push(data, last, n_events)
                run += 1
            elif pusher.cursor != last:  # behind, busy, or out of order: it reads from history
                if cost < 0:
                    cost = sum(len(e.data) for e in events) + 64 * len(events)
                pusher.lag(cost)  # a subscriber too far behind is cut (slow consumer)
                pusher.wake()
        if run:
            counts[kind] = counts.get(kind, 0) + run
        for kind, n in counts.items():
            data = encoded[kind]
            size = len(data) if isinstance(data, bytes) else sum(len(p) for _, p in data)
            self.observer.delivered(kind, n, events, n * size)

    # -- reading -------------------------------------------------------------------------
    def read(self, channel: str, since: str | None, limit: int) -> Batch:
        return self.store.read(channel, since, limit)

    def last_id(self, channel: str) -> str:
        return self.store.last_id(channel)

    def wait(self, channel: str, since: str | None, timeout: float, limit: int) -> Batch:
        """Events after `since`, waiting up to `timeout` s for the first; returns early, with
        whatever there is, when a gap is found or the hub is closing."""
        if self.closing or timeout <= 0:
            return self.store.read(channel, since, limit)
        deadline = time.monotonic() + timeout
        self._waiting[channel] += 1
        try:
            while True:
                # Take the signal before reading, so a publish in between still wakes us.
                signal = self._signals.get(channel)
                if signal is None:
                    signal = self._signals[channel] = self._event_class()
                batch = self.read_shared(channel, since, limit)
                remaining = deadline - time.monotonic()
                if batch.events or batch.gap or self.closing or remaining <= 0:
                    return batch
                self.wait_on(signal, remaining)
                since = batch.cursor if since is None else since
        finally:
            self._waiting[channel] -= 1
            if not self._waiting[channel]:  # nobody waits here any more: drop the signal
                del self._waiting[channel]
                self._signals.pop(channel, None)

    def read_shared(self, channel: str, since: str | None, limit: int) -> Batch:
        """A long poll's read, shared with the others woken by the same event: they nearly all
        ask from the same cursor, and each would otherwise read and encode the same batch. Kept
        until the channel's next event or SHARED_READ_S, also while no poll is held there (the
        polls of a busy channel are often all between two requests); the sweep drops the stale."""
        shared = self._shared.get(channel)
        now = time.monotonic()
        if shared is not None:
            if now < shared[3]:
                if shared[0] == since and shared[1] == limit:
                    return shared[2]
            else:
                self._drop_shared(channel)
        if now >= self._next_shared_sweep:
            self._sweep_shared(now)
        wakes = self._wakes
        batch = self.store.read(channel, since, limit)
        # Kept only if no event came in during the read (a shared store's read yields), and
        # briefly: the polls woken together read it at once; history may age out after that.
        if (batch.events or batch.gap) and wakes == self._wakes:
            size = sum(len(e.data) for e in batch.events) + 64
            if len(self._shared) >= SHARED_READS_KEPT or self._shared_bytes + size > SHARED_READ_BYTES:
                self._shared.clear()
                self._shared_bytes = 0
            self._drop_shared(channel)
            self._shared[channel] = (since, limit, batch, now + SHARED_READ_S, size)
            self._shared_bytes += size
        return batch

    def _drop_shared(self, channel: str) -> None:
        read = self._shared.pop(channel, None)
        if read is not None:
            self._shared_bytes -= read[4]

    def _sweep_shared(self, now: float) -> None:
        """Stale shared reads go (at most every SHARED_READ_S): they must not keep events that
        history has let go, nor memory on a quiet gateway."""
        self._next_shared_sweep = now + SHARED_READ_S
        for channel in [c for c, read in self._shared.items() if read[3] <= now]:
            self._drop_shared(channel)

    def wait_many(self, starts: dict[str, str | None], timeout: float, limit: int) -> dict[str, Batch]:
        """wait() over several channels: returns as soon as any has events (or a gap), with a
        batch for every channel. `starts` maps channel -> cursor (None: from now)."""
        deadline = time.monotonic() + timeout
        woken = self._event_class()
        channels = list(starts)
        for channel in channels:
            self._extra.setdefault(channel, set()).add(woken)
        try:
            cursors = dict(starts)
            while True:
                woken.clear()
                batches = {c: self.store.read(c, cursors[c], limit) for c in channels}
                remaining = deadline - time.monotonic()
                if any(b.events or b.gap for b in batches.values()) or self.closing or remaining <= 0:
                    return batches
                self.wait_on(woken, remaining)
                cursors = {c: cursors[c] if cursors[c] is not None else batches[c].cursor for c in channels}
        finally:
            for channel in channels:
                waiters = self._extra.get(channel)
                if waiters is not None:
                    waiters.discard(woken)
                    if not waiters:
                        del self._extra[channel]

    # -- who is listening ----------------------------------------------------------------
    @contextmanager
    def subscription(self, channel: str) -> Iterator[None]:
        """Count a streaming reader (SSE, WebSocket, a held long poll) for its lifetime."""
        self.subscribe(channel)
        try:
            yield
        finally:
            self.unsubscribe(channel)

    def subscribe(self, channel: str) -> None:
        self._subscribers[channel] += 1
        if self._subscribers[channel] == 1:
            self._tell(channel, 1)

    def unsubscribe(self, channel: str) -> None:
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

    def has_channel(self, channel: str) -> bool:
        """Known to this process: it has subscribers here, or (a local store) a history."""
        local = self.store.local_channels()
        return channel in self._subscribers or (local is not None and channel in local)

    def channel_count(self) -> int:
        """Channels this process holds (for limits.max_channels)."""
        local = self.store.local_channels()
        return len(self._subscribers) if local is None else len(local | self._subscribers.keys())

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Shutting down: wake every reader so each can tell its client to come back."""
        self.closing = True
        for channel in list(self._signals) + list(self._extra) + list(self._pushers):
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
            self._sweep_shared(now)
