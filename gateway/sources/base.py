"""What every upstream source shares: the run loop (lazy or eager), capped exponential backoff
with jitter, relaying into the hub with de-duplication, and the counters /status reports.

A subclass implements `_session()`: connect, call `_connected()` once the upstream accepted,
relay events until the upstream ends or `_interrupt()` is called, and raise UpstreamError (or
any library error) when something went wrong. The loop here decides when to (re)connect.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.config import SourceConfig
from gateway.errors import BadRequest, GatewayError
from gateway.hub import Hub
from gateway.names import RESERVED_EVENTS, check_event_name

__all__ = ["Source", "UpstreamError", "RecentIds", "expand_env", "public_url"]

log = logging.getLogger("gateway.sources")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UpstreamError(GatewayError):
    """The upstream answered, but not with what this source can relay (500, HTML, bad JSON...)."""


def expand_env(value: str, env: dict[str, str] | os._Environ | None = None) -> str:
    """Header values like "Bearer ${TOKEN}": the value with each ${NAME} replaced from the environment (a missing
    variable is caught by config validation, so here it just becomes empty)."""
    env = os.environ if env is None else env
    return _ENV_REF.sub(lambda m: env.get(m.group(1), ""), value)


def public_url(url: str) -> str:
    """The URL without credentials or query (they may hold secrets): safe for /status and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


class RecentIds:
    """A bounded set of recently relayed upstream ids: old ones fall out first."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


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

    def status(self) -> dict[str, Any]:
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
        return self._wanted and not self._stop.is_set()

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wanted:
                self.state = "idle"
                self._alert.wait()
                self._alert.clear()
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
        self.state = "stopped"

    def _connected(self) -> None:
        """The upstream accepted us: reset the backoff."""
        self.state = "connected"
        self._was_connected = True
        self._delay = self.cfg.backoff_initial_s

    def _pause(self, seconds: float) -> None:
        """Sleep between polls, waking early on stop or when a lazy source goes idle."""
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
        if upstream_id is not None:
            if self._replaying and upstream_id in self.seen:
                # The upstream re-sent what we relayed before the reconnect.
                self.duplicates += 1
                return False
            self._replaying = False
        if len(data.encode("utf-8")) > self.cfg.max_event_bytes:
            self._drop(f"an event of {len(data.encode('utf-8'))} bytes is over max_event_bytes")
            return False
        name = self._event_name(event)
        self.hub.publish(self.cfg.channel, data, name)  # a store failure raises: reconnect and replay
        if upstream_id is not None:
            self.seen.add(upstream_id)
        self.events_relayed += 1
        self.last_event_time = time.time()
        return True

    def _drop(self, why: str, count: int = 1) -> None:
        self.dropped += count
        log.warning("source %s: dropped %s (dropped so far: %d)", self.name, why, self.dropped)

    def _event_name(self, event: str | None) -> str:
        name = event or self.cfg.event or "message"
        if name in RESERVED_EVENTS:
            return f"upstream.{name}"  # "gap" and "error" are the gateway's own signals
        try:
            return check_event_name(name)
        except BadRequest:
            return self.cfg.event or "message"


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {text}"[:500]
