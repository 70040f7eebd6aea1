"""What every upstream source shares: the run loop (lazy or eager), capped exponential backoff
with jitter, relaying into the hub with de-duplication, and the counters /status reports.

A subclass implements `_session()`: connect, call `_connected()` once the upstream accepted,
relay events until the upstream ends or `_interrupt()` is called, and raise UpstreamError (or
any library error) when something went wrong. The loop here decides when to (re)connect.

With Redis (several processes, one config) a source relays only while it holds its lease
(lease.py): the others stand by, and the leader records its progress beside the lease so the
next one resumes without repeating or skipping what the upstream can replay.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from gateway.config import SourceConfig
from gateway.errors import BadRequest, GatewayError
from gateway.eventdata import InvalidData
from gateway.hub import Hub
from gateway.names import RESERVED_EVENTS, check_event_name
from gateway.redact import redact_text, redact_url

if TYPE_CHECKING:
    from gateway.sources.lease import Lease

__all__ = ["Source", "UpstreamError", "LeaseError", "LeaseLost", "RecentIds", "expand_env", "public_url"]

log = logging.getLogger("gateway.sources")

STOP_WAIT_S = 2.0  # how long stop() waits for the loop to hand the lease back

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UpstreamError(GatewayError):
    """The upstream answered, but not with what this source can relay (500, HTML, bad JSON...)."""


class LeaseError(GatewayError):
    """Redis could not be asked about a source's lease (down, unreachable, timed out)."""


class LeaseLost(GatewayError):
    """This process no longer holds the source's lease: it must stop relaying."""


def expand_env(value: str, env: dict[str, str] | os._Environ | None = None) -> str:
    """Header values like "Bearer ${TOKEN}": the value with each ${NAME} replaced from the environment (a missing
    variable is caught by config validation, so here it just becomes empty)."""
    env = os.environ if env is None else env
    return _ENV_REF.sub(lambda m: env.get(m.group(1), ""), value)


def public_url(url: str) -> str:
    """The URL with credentials masked (gateway/redact.py): safe for /status, pages and logs."""
    return redact_url(url)


class RecentIds:
    """A bounded set of recently relayed upstream ids: old ones fall out first. Long keys (a whole
    poll item) are kept as a hash. With a `journal`, additions are also queued there, for the
    lease to hand on to the next leader."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.journal: deque[str] | None = None

    def __contains__(self, key: str) -> bool:
        return _compact(key) in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, key: str) -> None:
        key = _compact(key)
        self._load(key)
        if self.journal is not None:
            self.journal.append(key)

    def load(self, keys: list[str]) -> None:
        """Remember keys another process relayed (oldest first), without journalling them."""
        for key in keys:
            self._load(_compact(key))

    def _load(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def _idempotency_key(source: str, upstream_id: str, data: str) -> str:
    digest = hashlib.sha256(f"{source}\0{upstream_id}\0{data}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"source:{digest[:40]}"


def _compact(key: str) -> str:
    return key if len(key) <= 200 else "#" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class Source:
    kind = ""

    def __init__(self, cfg: SourceConfig, hub: Hub) -> None:
        self.cfg = cfg
        self.hub = hub
        self.headers = {name: expand_env(value) for name, value in cfg.headers.items()}
        self.state = "idle"
        self.last_event_time: float | None = None
        self.events_relayed = 0
        self.last_error = ""
        self.reconnects = 0
        self.dropped = 0  # oversized or unrelayable events
        self.duplicates = 0  # events the upstream re-sent after a reconnect
        self.seen = RecentIds()
        self._replaying = False  # at the start of a session: drop ids already relayed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._alert = threading.Event()  # set on stop and on lazy connect/idle changes
        self._wanted = cfg.mode == "eager"
        self._idle_timer: threading.Timer | None = None
        self._thread: threading.Thread | None = None
        self._delay = cfg.backoff_initial_s
        self.retry_s: float | None = None  # the upstream's own reconnect hint (SSE retry:)
        self._was_connected = False
        self.lease: Lease | None = None  # with Redis: relay only while holding it (see lease.py)
        self._saved_state: dict[str, str] = {}
        self._standby_for = ""  # the holder we last logged standing by for
        self._journalled: list[RecentIds] = []  # the id sets whose additions go to the lease
        if cfg.mode == "lazy":
            # Registered now, not in start(): a client may subscribe before services start.
            hub.add_listener(self._on_subscribers)

    @property
    def name(self) -> str:
        return f"{self.kind}->{self.cfg.channel}"

    # -- lifecycle (a service: the server calls start() and stop()) -----------------------
    def start(self) -> None:
        if self.cfg.mode == "lazy":
            self._wanted = self.hub.subscribers(self.cfg.channel) > 0
        self._thread = threading.Thread(target=self._run, name=f"source:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._alert.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._interrupt()
        thread = self._thread
        if self.lease is not None and thread is not None and thread is not threading.current_thread():
            # The loop hands the lease back on its way out; wait for it (briefly) so a standby
            # can take over at once instead of after the ttl.
            thread.join(STOP_WAIT_S)

    def status(self) -> dict[str, Any]:
        lease = self.lease
        return {
            "kind": self.kind,
            "url": public_url(self.cfg.url),
            "channel": self.cfg.channel,
            "mode": self.cfg.mode,
            "state": self.state,
            "last_event_time": self.last_event_time,
            "events_relayed": self.events_relayed,
            "last_error": self.last_error,
            "reconnects": self.reconnects,
            "dropped": self.dropped,
            "duplicates": self.duplicates,
            "lease": None
            if lease is None
            else {"leader": lease.valid(), "holder": lease.holder or None, "ttl_s": lease.ttl_s},
        }

    # -- lazy mode -----------------------------------------------------------------------
    def _on_subscribers(self, channel: str, n: int) -> None:
        if channel != self.cfg.channel:
            return
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if n:
                self._wanted = True
                self._alert.set()
            else:
                self._idle_timer = threading.Timer(self.cfg.lazy_grace_s, self._go_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()

    def _go_idle(self) -> None:
        with self._lock:
            if self.hub.subscribers(self.cfg.channel) > 0:
                return
            self._wanted = False
            self._idle_timer = None
        log.info("source %s: no subscribers for %.1f s, disconnecting", self.name, self.cfg.lazy_grace_s)
        self._alert.set()
        self._interrupt()

    def _active(self) -> bool:
        return self._wanted and not self._stop.is_set() and (self.lease is None or self.lease.valid())

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wanted:
                self._step_down()  # lazy and nobody listens here: let a process with listeners lead
                self.state = "idle"
                self._alert.wait()
                self._alert.clear()
                continue
            if not self._lead():
                continue
            self.state = "connecting"
            self._replaying = True
            self._was_connected = False
            try:
                self._session()
                error = None
            except Exception as exc:  # any library error: log it, back off, try again
                error = _describe(exc)
            if self._stop.is_set():
                break
            if not self._wanted:
                continue  # lazy and idle: disconnected on purpose, no backoff
            if self.lease is not None and not self.lease.valid():
                continue  # lost the lease (logged by _lease_lost): back to trying to lead
            self.reconnects += 1
            if error is None or self._was_connected:
                # A stream that had been up ended (closed, or cut): come back after the upstream's
                # retry hint, as an EventSource would; backoff is for failures to connect.
                wait = self.retry_s if self.retry_s is not None else self.cfg.backoff_initial_s
                self.state = "reconnecting"
                if error is not None:
                    self.last_error = error
                why = "closed the stream" if error is None else f"dropped the stream ({error})"
                log.info("source %s: upstream %s; reconnecting in %.2f s", self.name, why, wait)
            else:
                wait = self._delay * random.uniform(0.5, 1.0)  # jitter: many gateways must not retry in step
                self._delay = min(self._delay * 2, self.cfg.backoff_max_s)
                self.state = "error"
                self.last_error = error
                log.warning("source %s: %s; retrying in %.2f s", self.name, error, wait)
            self._stop.wait(wait)
        self._step_down()
        self.state = "stopped"

    def _connected(self) -> None:
        """The upstream accepted us: reset the backoff."""
        self.state = "connected"
        self._was_connected = True
        self._delay = self.cfg.backoff_initial_s

    def _pause(self, seconds: float) -> None:
        """Sleep between polls, waking early on stop or when a lazy source goes idle."""
        self._checkpoint()  # a poll's validators and digest are set by now
        self._alert.wait(seconds)
        if self._wanted:
            self._alert.clear()

    # -- for subclasses --------------------------------------------------------------------
    def _session(self) -> None:
        raise NotImplementedError

    def _interrupt(self) -> None:
        """Break a blocked read of the current connection (stop, or lazy idle)."""

    def _relay(self, data: str, event: str | None = None, upstream_id: str | None = None) -> bool:
        """Publish one upstream event; False if it was a duplicate or had to be dropped."""
        # An upstream event is known by its id and its data: an upstream that restarted reuses
        # ids for new events, and those are news, not a replay.
        key = None if upstream_id is None else _idempotency_key(self.name, upstream_id, data)
        if key is not None:
            if self._replaying and key in self.seen:
                # The upstream re-sent what we relayed before the reconnect.
                self.duplicates += 1
                return False
            self._replaying = False
        size = len(data.encode("utf-8", "surrogatepass"))  # not yet checked: Hub.publish refuses surrogates
        if size > self.cfg.max_event_bytes:
            self._drop(f"an event of {size} bytes is over max_event_bytes")
            return False
        name = self._event_name(event)
        if self.lease is not None:
            self._checkpoint()  # what the previous relay left (a poll adds its item key after us)
            if not self.lease.valid():
                raise LeaseLost("the lease ran out: another process may be relaying this upstream now")
        # A store failure raises: reconnect and replay. The publish that failed may have been
        # stored all the same (a stalled Redis runs it later), so the replay repeats it with the
        # same Idempotency-Key, made of the upstream's id and the data, and stores nothing new.
        try:
            self.hub.publish(self.cfg.channel, data, name, idempotency_key=key)
        except InvalidData as exc:
            # Refused for good (a lone surrogate): retrying would refuse it again and wedge the
            # source, so skip it and count it as seen, like an oversized event.
            self._drop(f"an event the gateway refuses ({exc.detail})")
            if key is not None:
                self.seen.add(key)
            return False
        if key is not None:
            self.seen.add(key)
        self.events_relayed += 1
        self.last_event_time = time.time()
        self._checkpoint(upstream_id)
        return True

    # -- leading (only with Redis: one process relays each upstream) -------------------------
    def use_lease(self, lease: Lease) -> None:
        """From now on relay only while holding `lease`, and hand progress on to the next leader."""
        self.lease = lease
        self._journalled = [value for value in vars(self).values() if isinstance(value, RecentIds)]
        for ids in self._journalled:
            ids.journal = deque(maxlen=ids.capacity)

    def _lead(self) -> bool:
        """True when this process may relay; otherwise wait ttl/2 as standby and return False."""
        lease = self.lease
        if lease is None or lease.valid():
            return True
        try:
            won = lease.acquire()
        except LeaseError as exc:
            if self.last_error != _describe(exc):
                log.warning("source %s: %s; standby, retrying in %.2f s", self.name, _describe(exc), lease.ttl_s / 2)
            self.state, self.last_error = "standby", _describe(exc)
            self._pause(lease.ttl_s / 2)
            return False
        if not won:
            if self.state != "standby" or self._standby_for != lease.holder:
                log.info("source %s: standby; %s relays it", self.name, lease.holder)
            self.state, self._standby_for = "standby", lease.holder
            self._pause(lease.ttl_s / 2)
            return False
        self._resume_from(*lease.resumed)
        lease.keep(self._lease_lost)
        self._standby_for = ""
        log.info("source %s: leading (lease %s, ttl %.1f s)", self.name, lease.token, lease.ttl_s)
        return True

    def _lease_lost(self, reason: str) -> None:
        """From the renewer: stop relaying at once (the session ends) and try to lead again."""
        log.warning("source %s: lost the lease (%s); stopped relaying, trying to lead again", self.name, reason)
        self.state = "standby"
        self._alert.set()
        self._interrupt()

    def _step_down(self) -> None:
        """Hand progress and the lease back (stop, or lazy and idle)."""
        lease = self.lease
        if lease is None or not lease.held:
            return
        try:
            self._checkpoint()
            lease.release()
            log.info("source %s: released the lease", self.name)
        except GatewayError as exc:
            lease.held = False  # it expires by itself after the ttl
            log.warning(
                "source %s: could not release the lease (%s); it expires in %.1f s", self.name, exc, lease.ttl_s
            )

    def _checkpoint(self, upstream_id: str | None = None) -> None:
        """Write what a new leader needs (last id, validators, recent ids) beside the lease."""
        lease = self.lease
        if lease is None or not lease.held:
            return
        state = self._resume_state()
        if upstream_id is not None and "last_id" in state:
            state["last_id"] = upstream_id  # an SSE source records its last id only after we return
        ids = [key for ids in self._journalled if ids.journal for key in ids.journal]
        if state == self._saved_state and not ids:
            return
        try:
            ok = lease.save(state if state != self._saved_state else None, ids)
        except LeaseError as exc:
            log.warning("source %s: could not record progress for the next leader (%s)", self.name, exc)
            return  # kept: the next checkpoint writes it
        for journalled in self._journalled:
            if journalled.journal is not None:
                journalled.journal.clear()
        self._saved_state = state
        if not ok:
            raise LeaseLost("the lease is no longer ours: another process relays this upstream now")

    # What each kind keeps to resume without repeating itself: the SSE last event id, the poll
    # validators and body digest. Recent ids (SSE ids, poll item keys) travel in `_journalled`.
    _RESUME_ATTRS = (("last_id", "upstream_last_id"), ("etag", "_etag"), ("last_modified", "_last_modified"))

    def _resume_state(self) -> dict[str, str]:
        state = {field: getattr(self, attr) for field, attr in self._RESUME_ATTRS if hasattr(self, attr)}
        digest = getattr(self, "_digest", None)
        if isinstance(digest, bytes):
            state["digest"] = digest.hex()
        return state

    def _resume_from(self, state: dict[str, str], ids: list[str]) -> None:
        """Carry on where the previous leader stopped (nothing stored: keep our own)."""
        for recent in self._journalled:
            recent.load(ids)
        for field, attr in self._RESUME_ATTRS:
            if field in state and hasattr(self, attr):
                setattr(self, attr, state[field])
        if "digest" in state and isinstance(getattr(self, "_digest", None), bytes):
            try:
                self._digest = bytes.fromhex(state["digest"])
            except ValueError:
                pass
        self._saved_state = state  # nothing stored yet: the next checkpoint writes ours
        if state or ids:
            log.info("source %s: resuming from %s with %d recent id(s)", self.name, state or "nothing", len(ids))

    def _drop(self, why: str, count: int = 1) -> None:
        self.dropped += count
        log.warning("source %s: dropped %s (dropped so far: %d)", self.name, why, self.dropped)

    def _event_name(self, event: str | None) -> str:
        name = (event or self.cfg.event or "message").strip()
        if name in RESERVED_EVENTS:
            return f"upstream.{name}"  # "gap" and "error" are the gateway's own signals
        try:
            return check_event_name(name)
        except BadRequest:
            return self.cfg.event or "message"


def _describe(exc: Exception) -> str:
    text = redact_text(str(exc)) or type(exc).__name__  # library errors quote the URL, query and all
    return text if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {text}"[:500]
