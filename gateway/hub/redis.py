"""Redis channel store: channels and their history live in Redis Streams, so any number of
gateway processes share them.

Each channel is one stream (`<prefix>c:<channel>`); Redis issues the "<ms>-<seq>" ids, which
grow per stream even across clock hiccups. Every entry records the id of the entry before it
("p"), so gap detection is as exact as the memory store's. Appending and reading are each one
Lua script (one round trip, atomic). An append PUBLISHes "<node> <channel>" on
`<prefix>notify`; every process listens there and wakes its local readers of that channel.

Faults: a Redis error becomes BadRequest("backend_unavailable", ..., 503) at this boundary.
The one exception is a streaming reader (SSE, WebSocket, held long poll) that already holds a
cursor: it is told "nothing new yet", keeps its connection, and is woken when the listener has
reconnected, so streams outlive a short Redis outage instead of dropping every client at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from gateway.errors import BadRequest
from gateway.hub.events import Batch, Event
from gateway.hub.hub import Hub
from gateway.ids import ZERO, format_id, parse

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
KEEPALIVE_S = 15.0  # how often the listener probes its subscription and renews local channels' TTLs
ECHO_TIMEOUT_S = 2 * KEEPALIVE_S + 5  # no probe came back for this long: reconnect
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
ERROR_LOG_EVERY_S = 5.0
POOL_WAIT_S = 5.0  # how long a command waits for a free pooled connection
FLIGHT_WAIT_S = 30.0  # bound on waiting for another reader's identical read (its own timeouts come first)

# Ids are compared as strings without leading zeros: longer is bigger, else lexicographic.
# (Lua numbers are doubles, which cannot hold every 64-bit id part exactly.)
_ID_LESS = """
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
"""

# KEYS[1] stream, KEYS[2] channel index (zset: channel -> last publish ms).
# ARGV: event, data, size, max_age_ms, ttl_ms, notify topic, notify message, channel.
# Returns {id, prev}.
_APPEND = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if #top > 0 then prev = top[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'e', ARGV[1], 'd', ARGV[2], 'p', prev)
local ms = tonumber(string.match(id, '^(%d+)'))
local cutoff = ms - tonumber(ARGV[4])
if cutoff > 0 then redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d', cutoff)) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ms, ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%d', ms - tonumber(ARGV[5])))
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {id, prev}
"""

# KEYS[1] stream. ARGV: since (canonical; "" = from now), limit, max_age_ms.
# Returns {last ("" = no such channel), known (0/1), entries after since (up to limit + 1)}.
# Events older than max_age are treated as gone even before an append trims them.
_READ = (
    _ID_LESS
    + """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top == 0 then return {'', 0, {}} end
local last = top[1][1]
local since = ARGV[1]
if since == '' or since == last then return {last, 1, {}} end
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
if cutoff < 0 then cutoff = 0 end
local floor = string.format('%d-0', cutoff)
local start = floor
local known = 0
local has_before = false
if not id_less(since, floor) then
  start = '(' .. since
  local before = redis.call('XREVRANGE', KEYS[1], since, floor, 'COUNT', 1)
  if #before > 0 then
    has_before = true
    if before[1][1] == since then known = 1 end
  end
end
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', tonumber(ARGV[2]) + 1)
if not has_before and #entries > 0 then
  -- since precedes everything retained: known only as the oldest event's predecessor
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and fields[i + 1] == since then known = 1 end
  end
end
return {last, known, entries}
"""
)


class RedisStore:
    """The Store protocol (see hub.py) over Redis; attach(hub) starts the cross-process wake-ups."""

    def __init__(
        self,
        url: str,
        size: int,
        max_age_s: float,
        prefix: str = "gw:",
        tls_verify: bool = True,
        max_connections: int = 50,
    ) -> None:
        self._size = size
        self._max_age_ms = max(1, int(max_age_s * 1000))
        # Keys outlive their last event for a while, so a reader who comes back with the last id
        # is still recognised; channels somebody streams here are kept alive by the listener.
        self._ttl_ms = 2 * self._max_age_ms + 60_000
        self._prefix = prefix
        self._topic = f"{prefix}notify"
        self._index = f"{prefix}channels"
        self._node = uuid.uuid4().hex[:12]
        common: dict[str, Any] = {
            "decode_responses": True,
            "encoding_errors": "surrogatepass",
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        }
        if url.startswith("rediss://") and not tls_verify:
            common["ssl_cert_reqs"] = "none"
        # One immediate retry replaces a pooled connection that died with a restarted Redis;
        # timeouts are not retried, so an append that may have run is never run twice.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        # A bounded pool that makes callers wait their turn (gevent-friendly) rather than fail
        # when hundreds of readers are woken at once.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=POOL_WAIT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            retry=retry,
            **common,
        )
        self._client = redis.Redis(connection_pool=pool)
        self._listen_client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **common)
        self._append = self._client.register_script(_APPEND)
        self._read = self._client.register_script(_READ)
        self._hub: Hub | None = None
        self._local: set[str] = set()  # channels with streaming readers in this process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: Any = None  # the listener's current subscription
        self.connected = False  # the listener's view: subscribed to the notify topic right now
        # The listener lost Redis to a connection error (not e.g. a refused SUBSCRIBE, after which
        # reads still work and heartbeats deliver): streaming reads skip Redis until it is back.
        self._offline = False
        self._failures = 0
        self._next_error_log = 0.0
        self._flights: dict[tuple[str, str, int], _Flight] = {}  # reads in progress, see _fetch
        self._gens: dict[str, int] = {}  # channels streamed here -> count of wake-ups so far

    # -- wiring --------------------------------------------------------------------------
    def attach(self, hub: Hub) -> None:
        """Wake `hub`'s readers on events published by other processes (a background thread)."""
        self._hub = hub
        hub.add_listener(self._on_subscribers)
        self._thread = threading.Thread(target=self._listen, name="redis-listener", daemon=True)
        self._thread.start()

    # -- the Store protocol ----------------------------------------------------------------
    def append(self, channel: str, event: str, data: str, idempotency_key: str | None = None) -> Event:
        # TODO(ops branch): honour idempotency_key atomically in _APPEND (contract "Publishing retries").
        message = f"{self._node} {channel}"
        args = [event, data, self._size, self._max_age_ms, self._ttl_ms, self._topic, message, channel]
        try:
            id_, prev = self._append(keys=[self._key(channel), self._index], args=args)
        except RedisError as exc:
            raise self._unavailable("publish", exc) from None
        self._bump(channel)  # before the hub wakes this process's readers
        key = parse(id_)
        return Event(id_, event, data, key, prev, key[0] / 1000)

    def read(self, channel: str, since: str | None, limit: int) -> Batch:
        key = parse(since) if since is not None else None
        canonical = format_id(key) if key is not None else ""
        # A stream's reader (it holds a cursor) waits out an outage: "nothing new yet", and the
        # listener wakes it once it has reconnected. While the listener cannot reach Redis we do
        # not even try, so thousands of heartbeats do not hammer a dead server.
        waits_out = since is not None and channel in self._local
        if waits_out and self._offline:
            return Batch([], since)
        try:
            last, known, events, more = self._fetch(channel, canonical, limit)
        except RedisError as exc:
            if waits_out:
                return Batch([], since)
            raise self._unavailable("read", exc) from None
        if not last:
            return Batch([], ZERO, gap=canonical not in ("", ZERO))
        if not events:
            return Batch([], last, gap=not known)
        return Batch(list(events), events[-1].id, gap=not known, more=more)

    def last_id(self, channel: str) -> str:
        try:
            top = self._client.xrevrange(self._key(channel), count=1)
        except RedisError as exc:
            raise self._unavailable("read", exc) from None
        return top[0][0] if top else ZERO

    def channels(self) -> list[str]:
        """Channels published to within a key's lifetime (an index, not a SCAN of the keyspace:
        /healthz and / call this, and Redis may hold millions of other keys)."""
        since_ms = int(time.time() * 1000) - self._ttl_ms
        try:
            return self._client.zrangebyscore(self._index, since_ms, "+inf")
        except RedisError as exc:
            raise self._unavailable("list channels", exc) from None

    def sweep(self, busy: Callable[[str], bool]) -> int:
        return 0  # Redis trims on append and expires idle channels itself

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=0.1)  # it notices within its poll interval; no need to wait
        self._client.close()
        self._listen_client.close()

    def ping(self) -> bool:
        """Whether Redis answers right now."""
        try:
            return bool(self._client.ping())
        except RedisError:
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
        except RedisError as exc:
            flight.error = exc
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    def _fetch_now(self, channel: str, canonical: str, limit: int) -> _Result:
        last, known, entries = self._read(keys=[self._key(channel)], args=[canonical, limit, self._max_age_ms])
        return last, bool(known), [_event(entry) for entry in entries[:limit]], len(entries) > limit

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

    def _listen(self) -> None:
        delay = BACKOFF_INITIAL_S
        first = True
        while not self._stop.is_set():
            pubsub = self._pubsub = self._listen_client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._topic)
                self.connected, self._offline = True, False
                if not first:
                    log.info("redis listener reconnected; waking readers of %d channel(s)", len(self._local))
                # Whatever was published while we were not listening: every local reader re-reads.
                for channel in list(self._local):
                    self._wake(channel)
                first = False
                delay = BACKOFF_INITIAL_S
                self._pump(pubsub)
            except Exception as exc:  # the listener must outlive anything, or wake-ups stop for good
                if self._stop.is_set():
                    break
                self.connected = False
                self._offline = isinstance(exc, (RedisConnectionError, RedisTimeoutError))
                first = False
                pause = delay * random.uniform(0.5, 1.0)
                if isinstance(exc, RedisError):
                    log.warning("redis listener disconnected (%s%s); retrying in %.2f s", exc, _hint(exc), pause)
                else:
                    log.exception("redis listener failed; retrying in %.2f s", pause)
                self._stop.wait(pause)
                delay = min(delay * 2, BACKOFF_MAX_S)
            finally:
                self.connected = False
                try:
                    pubsub.close()
                except RedisError:
                    pass

    def _pump(self, pubsub: Any) -> None:
        next_keepalive = heard = time.monotonic()
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=min(1.0, KEEPALIVE_S))
            now = time.monotonic()
            if message is not None and message.get("type") == "message":
                heard = now
                node, _, channel = str(message["data"]).partition(" ")
                if node != self._node:  # our own publishes already woke our readers
                    self._wake(channel)
            if now >= next_keepalive:
                next_keepalive = now + KEEPALIVE_S
                self._keep_alive()
            if now - heard > ECHO_TIMEOUT_S:
                # A connection that died without a word (a network partition) never errors.
                raise RedisConnectionError(f"no echo on {self._topic} for {now - heard:.0f} s")

    def _keep_alive(self) -> None:
        """Echo a probe through our own subscription (proof it still works), and push out the
        TTL of channels streamed here (as memory's sweep spares busy channels)."""
        now_ms = int(time.time() * 1000)
        with self._client.pipeline(transaction=False) as pipe:
            pipe.publish(self._topic, f"{self._node} ")
            for channel in list(self._local):
                pipe.pexpire(self._key(channel), self._ttl_ms)
                pipe.zadd(self._index, {channel: now_ms}, xx=True)
            pipe.execute()

    def _wake(self, channel: str) -> None:
        self._bump(channel)
        if self._hub is not None and channel:
            self._hub.notify(channel)

    def _key(self, channel: str) -> str:
        return f"{self._prefix}c:{channel}"

    def _unavailable(self, action: str, exc: Exception) -> BadRequest:
        """Our 503 for a Redis error; logged at most every few seconds, however many requests fail."""
        now = time.monotonic()
        self._failures += 1
        if now >= self._next_error_log:
            self._next_error_log = now + ERROR_LOG_EVERY_S
            log.warning(
                "redis unavailable (%s): %s%s [%d failed call(s) since the last report]",
                action,
                exc,
                _hint(exc),
                self._failures,
            )
            self._failures = 0
        return BadRequest(
            "backend_unavailable",
            f"cannot {action}: the Redis backend is unavailable ({type(exc).__name__}); try again shortly",
            503,
        )


_Result = tuple[str, bool, list[Event], bool]  # last id ("" = no channel), cursor known, events, more


class _Flight:
    __slots__ = ("gen", "done", "result", "error")

    def __init__(self, gen: int) -> None:
        self.gen = gen
        self.done = threading.Event()
        self.result: _Result | None = None
        self.error: Exception | None = None


def _hint(exc: Exception) -> str:
    """The fix for the one failure operators meet most: a managed Redis's self-signed certificate."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "; for a self-signed certificate (Heroku Redis) set redis.tls_verify = false"
    return ""


def _event(entry: list[Any]) -> Event:
    id_, flat = entry
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    key = parse(id_)
    return Event(id_, fields["e"], fields["d"], key, fields["p"], key[0] / 1000)
