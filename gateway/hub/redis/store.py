"""RedisStore: the Store protocol (see hub.py) over Redis Streams."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.hub.events import Batch, Event
from gateway.hub.hub import Hub
from gateway.hub.memory import EVENT_OVERHEAD
from gateway.hub.redis.connection import ERRORS, ErrorReporter, connect, never_sent
from gateway.hub.redis.listener import Listener
from gateway.hub.redis.scripts import APPEND, READ, event_from_entry
from gateway.ids import ZERO, format_id, parse

__all__ = ["RedisStore"]

log = logging.getLogger("gateway.hub.redis")

FLIGHT_WAIT_S = 30.0  # bound on waiting for another reader's identical read (its own timeouts come first)


class RedisStore:
    """The Store protocol over Redis; attach(hub) starts the cross-process wake-ups."""

    def __init__(
        self,
        url: str,
        size: int,
        max_age_s: float,
        prefix: str = "gw:",
        tls_verify: bool = True,
        max_connections: int = 50,
        max_bytes: int = 4_194_304,
        cluster: bool = False,
    ) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._cluster = cluster
        self._max_age_ms = max(1, int(max_age_s * 1000))
        # Keys outlive their last event for a while, so a reader who comes back with the last id
        # is still recognised; channels somebody streams here are kept alive by the listener.
        self._ttl_ms = 2 * self._max_age_ms + 60_000
        self._prefix = prefix
        self._topic = f"{prefix}notify"
        self._index = f"{prefix}channels"
        self._node = uuid.uuid4().hex[:12]
        self._client, listen_client = connect(url, tls_verify, max_connections, cluster)
        self._append = self._client.register_script(APPEND)
        self._read = self._client.register_script(READ)
        self._errors = ErrorReporter()
        self._hub: Hub | None = None
        self._local: set[str] = set()  # channels with streaming readers in this process
        self._listener = Listener(
            listen_client, self._topic, self._node, self._wake, self._on_connect, self._keep_alive
        )
        self._listen_client = listen_client
        self._flights: dict[tuple[str, str, int], _Flight] = {}  # reads in progress, see _fetch
        self._last_flights: dict[str, _Flight] = {}  # last_id calls in progress
        self._gens: dict[str, int] = {}  # channels streamed here -> count of wake-ups so far

    @property
    def connected(self) -> bool:
        """The listener's view: subscribed to the notify topic right now."""
        return self._listener.connected

    # -- wiring --------------------------------------------------------------------------
    def attach(self, hub: Hub) -> None:
        """Wake `hub`'s readers on events published by other processes (a background thread)."""
        self._hub = hub
        hub.add_listener(self._on_subscribers)
        self._listener.start()

    # -- the Store protocol ----------------------------------------------------------------
    def append(self, channel: str, event: str, data: str, idempotency_key: str | None = None) -> Event:
        message = f"{self._node} {channel}"
        keys = [self._key(channel), self._bytes_key(channel)]
        if idempotency_key is not None:
            keys.append(self._idempotency_key(channel, idempotency_key))
        if not self._cluster:  # in a cluster the index lives on another shard: updated below
            keys.append(self._index)
        has_key, has_index = int(idempotency_key is not None), int(not self._cluster)
        args = [event, data, self._size, self._max_age_ms, self._ttl_ms, self._topic, message, channel]
        args += [has_key, has_index, self._max_bytes, EVENT_OVERHEAD]
        try:
            id_, prev, repeat, *first = self._append(keys=keys, args=args)
        except ERRORS as exc:
            raise self._errors.unavailable("publish", exc, self._retry_advice(exc)) from None
        key = parse(id_)
        if repeat:
            ev = Event(id_, first[0], first[1], key, prev, key[0] / 1000)
            ev.repeat = True
            return ev
        if self._cluster:
            self._index_channel(channel, key[0])
        self._bump(channel)  # before the hub wakes this process's readers
        return Event(id_, event, data, key, prev, key[0] / 1000)

    @staticmethod
    def _retry_advice(exc: Exception) -> str:
        """The end of a failed publish's 503: whether it may have been stored after all (it
        was sent, and Redis may run it once it recovers), so the publisher knows what a retry
        without an Idempotency-Key risks."""
        if never_sent(exc):
            return "the event was not stored; try again shortly"
        return (
            "the event may still have been stored; retry with the same Idempotency-Key header "
            "to publish it exactly once"
        )

    def _index_channel(self, channel: str, ms: int) -> None:
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(self._index, {channel: ms})
                pipe.zremrangebyscore(self._index, "-inf", f"({ms - self._ttl_ms}")
                pipe.execute()
        except ERRORS as exc:  # the event is stored; only the listing of channels lags
            log.warning("redis: could not index channel %s (%s)", channel, exc)

    def read(self, channel: str, since: str | None, limit: int) -> Batch:
        key = parse(since) if since is not None else None
        canonical = format_id(key) if key is not None else ""
        # A stream's reader (it holds a cursor) waits out an outage: "nothing new yet", and the
        # listener wakes it once it has reconnected. While the listener cannot reach Redis we do
        # not even try, so thousands of heartbeats do not hammer a dead server.
        waits_out = since is not None and channel in self._local
        if waits_out and self._listener.offline:
            return Batch([], since)
        try:
            last, known, events, more = self._fetch(channel, canonical, limit)
        except ERRORS as exc:
            if waits_out:
                return Batch([], since)
            raise self._errors.unavailable("read", exc) from None
        if not last:
            return Batch([], ZERO, gap=canonical not in ("", ZERO))
        if not events:
            return Batch([], last, gap=not known)
        return Batch(list(events), events[-1].id, gap=not known, more=more)

    def last_id(self, channel: str) -> str:
        """Where a new reader "from now" starts. Callers for one channel at a time share one
        round trip (a reconnect storm opens thousands of streams at once); a shared answer can
        only be a little older than a fresh one, so a new reader may get an event more, never
        one fewer."""
        flight = self._last_flights.get(channel)
        if flight is not None:
            if not flight.done.wait(FLIGHT_WAIT_S) or flight.error is not None:
                raise self._errors.unavailable("read", flight.error or RedisConnectionError("shared read timed out"))
            return flight.result
        flight = self._last_flights[channel] = _Flight(0)
        try:
            top = self._client.xrevrange(self._key(channel), count=1)
            flight.result = top[0][0] if top else ZERO
            return flight.result
        except ERRORS as exc:
            flight.error = exc
            raise self._errors.unavailable("read", exc) from None
        finally:
            del self._last_flights[channel]
            flight.done.set()

    def local_channels(self) -> None:
        """None: the history lives in Redis, shared by every process."""
        return None

    def channels(self) -> list[str]:
        """Channels published to within a key's lifetime (an index, not a SCAN of the keyspace:
        /healthz and / call this, and Redis may hold millions of other keys)."""
        since_ms = int(time.time() * 1000) - self._ttl_ms
        try:
            return self._client.zrangebyscore(self._index, since_ms, "+inf")
        except ERRORS as exc:
            raise self._errors.unavailable("list channels", exc) from None

    def sweep(self, busy: Callable[[str], bool]) -> int:
        return 0  # Redis trims on append and expires idle channels itself

    def close(self) -> None:
        self._listener.stop()
        self._client.close()
        self._listen_client.close()

    def ping(self) -> bool:
        """Whether Redis answers right now."""
        try:
            return bool(self._client.ping())
        except ERRORS:
            return False

    def _fetch(self, channel: str, canonical: str, limit: int) -> _Result:
        """One round trip per (channel, cursor, limit) at a time: the readers one publish wakes
        share it, and share its Event objects, so each event is encoded once per wire format
        rather than once per subscriber. A reader joins a call only if no wake-up for the
        channel came since the call began (same generation): any later event then still wakes
        it, so sharing never delays an event. Only channels streamed here are shared."""
        gen = self._gens.get(channel)
        if gen is None:
            return self._fetch_now(channel, canonical, limit)
        key = (channel, canonical, limit)
        flight = self._flights.get(key)
        if flight is not None and flight.gen == gen:
            if not flight.done.wait(FLIGHT_WAIT_S):
                raise RedisConnectionError("timed out waiting for a shared read")
            if flight.error is not None:
                raise RedisConnectionError(str(flight.error))
            assert flight.result is not None
            return flight.result
        flight = self._flights[key] = _Flight(gen)
        try:
            flight.result = self._fetch_now(channel, canonical, limit)
            return flight.result
        except ERRORS as exc:
            flight.error = exc
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    def _fetch_now(self, channel: str, canonical: str, limit: int) -> _Result:
        last, known, entries = self._read(keys=[self._key(channel)], args=[canonical, limit, self._max_age_ms])
        return last, bool(known), [event_from_entry(entry) for entry in entries[:limit]], len(entries) > limit

    # -- cross-process wake-ups -----------------------------------------------------------
    def _on_subscribers(self, channel: str, n: int) -> None:
        if n:
            self._local.add(channel)
            self._gens.setdefault(channel, 0)
        else:
            self._local.discard(channel)
            self._gens.pop(channel, None)

    def _bump(self, channel: str) -> None:
        """A wake-up is coming for this channel: reads begun before it may no longer be shared."""
        if channel in self._gens:
            self._gens[channel] += 1

    def _on_connect(self, first: bool) -> None:
        if not first:
            log.info("redis listener reconnected; waking readers of %d channel(s)", len(self._local))
        # Whatever was published while we were not listening: every local reader re-reads (a
        # wake-up only: one read per channel here would hold the new subscription up).
        for channel in list(self._local):
            self._bump(channel)
            if self._hub is not None:
                self._hub.notify(channel)

    def _keep_alive(self, probe: str) -> None:
        """Echo a probe through our own subscription (proof it still works), and push out the
        TTL of channels streamed here (as memory's sweep spares busy channels)."""
        now_ms = int(time.time() * 1000)
        self._client.publish(self._topic, probe)  # on its own: a cluster pipeline refuses PUBLISH
        if not self._local:
            return
        with self._client.pipeline(transaction=False) as pipe:
            for channel in list(self._local):
                pipe.pexpire(self._key(channel), self._ttl_ms)
                pipe.pexpire(self._bytes_key(channel), self._ttl_ms)
                pipe.zadd(self._index, {channel: now_ms}, xx=True)
            pipe.execute()

    def _wake(self, channel: str) -> None:
        self._bump(channel)
        if self._hub is not None:
            self._hub.notified(channel)

    # Every key of a channel carries the channel as its hash tag ({...}): in a cluster they all
    # live on one shard, so a script may touch them together.
    def _key(self, channel: str) -> str:
        return f"{self._prefix}c:{{{channel}}}"

    def _bytes_key(self, channel: str) -> str:
        return f"{self._prefix}b:{{{channel}}}"

    def _idempotency_key(self, channel: str, key: str) -> str:
        return f"{self._prefix}i:{{{channel}}}:{key}"


_Result = tuple[str, bool, list[Event], bool]  # last id ("" = no channel), cursor known, events, more


class _Flight:
    __slots__ = ("gen", "done", "result", "error")

    def __init__(self, gen: int) -> None:
        self.gen = gen
        self.done = threading.Event()
        self.result: Any = None  # a _Result, or a last id
        self.error: Exception | None = None
