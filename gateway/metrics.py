"""Prometheus metrics, cheap on the hot path.

The hub and the admission path call plain methods that bump plain ints and floats (no locks, no
prometheus_client objects per delivery); the fan-out loop reports once per flush, and only one
flush in SAMPLE_EVERY is timed for the latency histogram. Everything is turned into metric
families when /metrics is scraped, by the Collector below: that is also when the upstream
sources, Redis and the process are looked at.

Several worker processes (or server.metrics_dir set, env GATEWAY_METRICS_DIR): each process
writes a snapshot of its counters there every few seconds (and the one answering a scrape writes
a fresh one first); /metrics, served by any worker, sums the snapshots of the workers alive
(gateway/metricsdir.py, docs/operations.md "Several workers"). Subscriber counts per channel are
asked of every worker when needed instead (gateway/survey.py).
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder, start_http_server
from prometheus_client.metrics_core import Metric

from gateway.errors import ConfigError
from gateway.hub import Event, Hub, Observer
from gateway.metricsdir import SnapshotDir, SnapshotWriter, private_dir, process_families, process_samples
from gateway.state import state
from gateway.survey import Survey

__all__ = ["Metrics", "init_app", "TRANSPORTS", "LATENCY_BUCKETS"]

log = logging.getLogger(__name__)

TRANSPORTS = ("poll", "longpoll", "sse", "ws")
# Wire formats of the fast path (hub.Pusher.kind) -> the transport they belong to.
_KIND_TRANSPORT = {
    "sse": "sse",
    "sse-chunked": "sse",
    "ws": "ws",
    "sse-multi": "sse",  # many channels on one connection (transports/multipush.py)
    "sse-multi-chunked": "sse",
    "ws-multi": "ws",
}
# Pushed answers of held long polls (transports/heldpoll.py): timed here, but counted when their
# ticket closes, as every poll answer is.
_COUNTED_AT_CLOSE = frozenset({"longpoll-held"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (1.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 6 * 3600.0, 24 * 3600.0)
SAMPLE_EVERY = 16  # time one fast-path flush in this many
REDIS_PING_TIMEOUT_S = 1.0
REDIS_PING_CACHE_S = 1.0  # scrapes closer than this reuse the last answer
SOURCE_STATES = ("idle", "connecting", "connected", "reconnecting", "error", "standby", "stopped")

# name -> (type, help, label names). Counters are named without _total (the library adds it).
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gateway_connections": ("gauge", "Open streams and held polls, by transport", ("transport",)),
    "gateway_longpolls_held": ("gauge", "Long polls held open right now", ()),
    "gateway_connections_opened": ("counter", "Connections admitted, by transport", ("transport",)),
    "gateway_connections_closed": ("counter", "Connections ended, by transport and reason", ("transport", "reason")),
    "gateway_connection_duration_seconds": ("histogram", "How long connections lasted", ("transport",)),
    "gateway_events_published": ("counter", "Events published (POST, WebSocket frames, upstreams)", ()),
    "gateway_events_delivered": ("counter", "Events written to subscribers, by transport", ("transport",)),
    "gateway_bytes_written": ("counter", "Bytes of events written to subscribers, by transport", ("transport",)),
    "gateway_delivery_latency_seconds": ("histogram", "Publish to socket write, sampled fast-path flushes", ()),
    "gateway_refusals": ("counter", "Subscriptions refused, by HTTP status and reason", ("status", "reason")),
    "gateway_limit_hits": ("counter", "Times a limit refused or cut something, by limit", ("limit",)),
    "gateway_slow_consumer_drops": ("counter", "Subscribers cut for an unsent backlog", ("transport",)),
    "gateway_publish_refusals": ("counter", "Publishes refused, by HTTP status and reason", ("status", "reason")),
    "gateway_subscribers": ("gauge", "Streaming subscriptions (one per channel of a connection)", ()),
    "gateway_source_up": ("gauge", "1 while an upstream source is connected", ("channel", "kind")),
    "gateway_source_state": ("gauge", "1 for each state a worker's source is in", ("channel", "kind", "state")),
    "gateway_source_reconnects": ("counter", "Upstream source reconnects", ("channel", "kind")),
    "gateway_source_events_relayed": ("counter", "Events relayed from an upstream source", ("channel", "kind")),
    "gateway_redis_up": ("gauge", "1 when Redis answered a PING at scrape time", ()),
    "gateway_redis_ping_seconds": ("gauge", "Round-trip time of that PING", ()),
    "gateway_workers": ("gauge", "Worker processes whose metrics this scrape covers", ()),
    "gateway_greenlets": ("gauge", "Live greenlets (counted at scrape time, not on the hot path)", ()),
}

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, its labels in a fixed order)


class _Histogram:
    """Bucket counts as plain ints; cumulative only when exported."""

    __slots__ = ("bounds", "counts", "total", "n")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def samples(self, name: str, labels: tuple[tuple[str, str], ...] = ()) -> Iterator[tuple[Key, float]]:
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else _fmt_bound(bound)
            yield (f"{name}_bucket", (*labels, ("le", le))), running
        yield (f"{name}_sum", labels), self.total
        yield (f"{name}_count", labels), self.n


def _fmt_bound(bound: float) -> str:
    return repr(float(bound))


class Metrics(Observer):
    """Counters of one process. The hub calls published()/delivered() (it is hub.observer);
    the admission path calls the connection_*/polled/refused/limit_hit/... methods."""

    def __init__(
        self,
        hub: Hub,
        sources: Callable[[], Sequence[Any]] = tuple,
        snapshot_dir: str = "",
        port: int = 0,
    ) -> None:
        self.hub = hub
        self.port = port  # > 0: served on 127.0.0.1:<port> by start(), not on the public port
        self._httpd: Any = None
        self.sources = sources  # -> state().sources, read at scrape time: each has .status()
        self.published_total = 0
        self.delivered_events = dict.fromkeys(TRANSPORTS, 0)
        self.bytes_written = dict.fromkeys(TRANSPORTS, 0)
        self.connections = dict.fromkeys(TRANSPORTS, 0)
        self.opened = dict.fromkeys(TRANSPORTS, 0)
        self.closed: Counter[tuple[str, str]] = Counter()
        self.refusals: Counter[tuple[str, str]] = Counter()
        self.publish_refusals: Counter[tuple[str, str]] = Counter()
        self.limit_hits: Counter[str] = Counter()
        self.slow_drops: Counter[str] = Counter()
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.durations = {t: _Histogram(DURATION_BUCKETS) for t in TRANSPORTS}
        self._flushes = 0
        self._redis_checked = 0.0
        self._redis: tuple[float, float] | None = None  # (up, seconds) of the last PING
        self.snapshot_dir = SnapshotDir(snapshot_dir) if snapshot_dir else None
        self._writer: SnapshotWriter | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if self.snapshot_dir is None:  # one process: the library's collectors read it directly
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    # -- from the hub (the hot path) -----------------------------------------------------------
    def published(self, channel: str, event: Event) -> None:
        self.published_total += 1

    def delivered(self, kind: str, subscribers: int, events: list[Event], nbytes: int) -> None:
        if kind not in _COUNTED_AT_CLOSE:
            self._count_delivered(_KIND_TRANSPORT.get(kind, kind), subscribers * len(events), nbytes)
        self._flushes += 1
        if self._flushes % SAMPLE_EVERY == 1:  # the first flush, then one in SAMPLE_EVERY
            # The oldest event of the batch: what its readers waited longest for.
            self.latency.observe(max(0.0, time.time() - events[0].time))

    def caught_up(self, kind: str, events: int, nbytes: int) -> None:
        """A stream wrote `events` events read back from history (resume, gap, or a busy
        moment): counted as delivered, but not timed, since their age is not the gateway's."""
        self._count_delivered(_KIND_TRANSPORT.get(kind, kind), events, nbytes)

    def _count_delivered(self, transport: str, events: int, nbytes: int) -> None:
        self.delivered_events[transport] = self.delivered_events.get(transport, 0) + events
        self.bytes_written[transport] = self.bytes_written.get(transport, 0) + nbytes

    # -- from the admission path ---------------------------------------------------------------
    def connection_opened(self, transport: str) -> None:
        self.connections[transport] = self.connections.get(transport, 0) + 1
        self.opened[transport] = self.opened.get(transport, 0) + 1

    def connection_closed(self, transport: str, reason: str, duration_s: float, events: int, nbytes: int) -> None:
        """A connection ended. Its events and bytes were counted when written (delivered(),
        polled()); they are taken here for the signature the connection log shares."""
        self.connections[transport] = self.connections.get(transport, 0) - 1
        self.closed[(transport, reason)] += 1
        hist = self.durations.get(transport)
        if hist is None:
            hist = self.durations[transport] = _Histogram(DURATION_BUCKETS)
        hist.observe(max(0.0, duration_s))

    def polled(self, transport: str, events: int, nbytes: int) -> None:
        """A poll or long-poll answer carried `events` events in `nbytes` bytes."""
        self._count_delivered(transport, events, nbytes)

    def refused(self, status: int, reason: str) -> None:
        self.refusals[(str(status), reason)] += 1

    def publish_refused(self, status: int, reason: str) -> None:
        self.publish_refusals[(str(status), reason)] += 1

    def limit_hit(self, limit_name: str) -> None:
        self.limit_hits[limit_name] += 1

    def slow_consumer_dropped(self, transport: str) -> None:
        self.slow_drops[transport] += 1

    # -- at scrape time ----------------------------------------------------------------------
    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) of every process this scrape covers, in the format the scraper
        asks for (Accept: Prometheus text, or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def snapshot(self) -> dict[str, Any]:
        """This process's samples as plain data: what a snapshot file holds."""
        summed: list[tuple[Key, float]] = []
        maxed: list[tuple[Key, float]] = []
        for t in TRANSPORTS:
            summed.append((("gateway_connections", (("transport", t),)), max(0, self.connections.get(t, 0))))
        summed.append((("gateway_longpolls_held", ()), max(0, self.connections.get("longpoll", 0))))
        summed.append((("gateway_subscribers", ()), self.hub.subscribers()))
        greenlets = live_greenlets()
        if greenlets is not None:
            summed.append((("gateway_greenlets", ()), greenlets))
        summed.append((("gateway_events_published_total", ()), self.published_total))
        for name, values in (
            ("gateway_connections_opened_total", self.opened),
            ("gateway_events_delivered_total", self.delivered_events),
            ("gateway_bytes_written_total", self.bytes_written),
        ):
            summed += [((name, (("transport", t),)), n) for t, n in _with_all(values)]
        summed += [
            (("gateway_connections_closed_total", (("transport", t), ("reason", r))), n)
            for (t, r), n in self.closed.items()
        ]
        refusals = [("gateway_refusals_total", self.refusals)]
        refusals.append(("gateway_publish_refusals_total", self.publish_refusals))
        for name, counter in refusals:
            summed += [((name, (("status", s), ("reason", r))), n) for (s, r), n in counter.items()]
        summed += [(("gateway_limit_hits_total", (("limit", k),)), n) for k, n in self.limit_hits.items()]
        summed += [(("gateway_slow_consumer_drops_total", (("transport", t),)), n) for t, n in self.slow_drops.items()]
        summed += list(self.latency.samples("gateway_delivery_latency_seconds"))
        for t, hist in self.durations.items():
            summed += list(hist.samples("gateway_connection_duration_seconds", (("transport", t),)))
        for status in self._source_statuses():
            labels = (("channel", str(status.get("channel", ""))), ("kind", str(status.get("kind", ""))))
            current = status.get("state")
            # With Redis, one process relays a source and the others stand by: the best state wins.
            maxed.append((("gateway_source_up", labels), 1.0 if current == "connected" else 0.0))
            for st in SOURCE_STATES:
                maxed.append((("gateway_source_state", (*labels, ("state", st))), 1.0 if current == st else 0.0))
            summed.append((("gateway_source_reconnects_total", labels), float(status.get("reconnects") or 0)))
            summed.append((("gateway_source_events_relayed_total", labels), float(status.get("events_relayed") or 0)))
        redis = self._ping_redis()
        if redis is not None:
            maxed.append((("gateway_redis_up", ()), redis[0]))
            maxed.append((("gateway_redis_ping_seconds", ()), redis[1]))
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "sum": [[name, list(labels), value] for (name, labels), value in summed],
            "max": [[name, list(labels), value] for (name, labels), value in maxed],
            "process": process_samples() if self.snapshot_dir is not None else [],
        }

    def _source_statuses(self) -> list[dict[str, Any]]:
        out = []
        for source in self.sources():
            try:
                out.append(source.status())
            except Exception:  # a scrape must not fail because one source misbehaves
                log.exception("source status failed")
        return out

    def _ping_redis(self) -> tuple[float, float] | None:
        """(up, round-trip seconds) from a PING bounded by REDIS_PING_TIMEOUT_S; None without
        Redis. Cached briefly, so frequent scrapes do not add load."""
        ping = getattr(self.hub.store, "ping", None)
        if ping is None:
            return None
        now = time.monotonic()
        if self._redis is not None and now - self._redis_checked < REDIS_PING_CACHE_S:
            return self._redis
        result: list[float] = []

        def run() -> None:
            started = time.perf_counter()
            ok = bool(ping())
            result.append(1.0 if ok else 0.0)
            result.append(time.perf_counter() - started)

        # A thread (a greenlet under gevent) so that a stalled Redis costs at most the timeout.
        worker = threading.Thread(target=run, name="metrics-redis-ping", daemon=True)
        worker.start()
        worker.join(REDIS_PING_TIMEOUT_S)
        self._redis = (result[0], result[1]) if len(result) == 2 else (0.0, REDIS_PING_TIMEOUT_S)
        self._redis_checked = now
        return self._redis

    # -- several workers -----------------------------------------------------------------------
    def start(self) -> None:
        """A Service: with a snapshot directory, write this process's snapshot regularly; with
        a port, serve the exposition there (the library's small server, loopback only)."""
        if self.snapshot_dir is not None and self._writer is None:
            private_dir(self.snapshot_dir.path)  # a directory others may write is a start-up error
            self._writer = SnapshotWriter(self.write_snapshot, self.snapshot_dir.remove)
            self._writer.start()
        if self.port and self._httpd is None:
            try:
                self._httpd, _ = start_http_server(self.port, "127.0.0.1", self.registry)
            except OSError as exc:
                raise ConfigError(
                    f"server.metrics_port: cannot listen on 127.0.0.1:{self.port} ({exc.strerror}); "
                    "pick a free port or 0"
                ) from None

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def write_snapshot(self) -> None:
        assert self.snapshot_dir is not None
        self.snapshot_dir.write(self.snapshot())

    def snapshots(self) -> list[dict[str, Any]]:
        """This process's fresh snapshot and those of the other workers alive."""
        if self.snapshot_dir is None:
            return [self.snapshot()]
        try:
            self.write_snapshot()
        except OSError:  # the others can still be read; ours is then the last one written
            log.exception("writing the metrics snapshot failed")
        return self.snapshot_dir.read()


def live_greenlets() -> int | None:
    """Greenlets alive in this process (None without the greenlet module). A scan of the
    collector's objects: tens of ms with many connections, so at scrape time only. A count that
    climbs while `gateway_connections` does not is a leaked greenlet."""
    try:
        from greenlet import greenlet
    except ImportError:
        return None
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead)


def _with_all(values: dict[str, int]) -> Iterable[tuple[str, int]]:
    """Every transport (so a series exists from the start), then any other key seen."""
    for t in TRANSPORTS:
        yield t, values.get(t, 0)
    for t, n in values.items():
        if t not in TRANSPORTS:
            yield t, n


class _Collector:
    """Builds metric families from the snapshots at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snaps = self.metrics.snapshots()
        merged: dict[Key, float] = {}
        for snap in snaps:
            for name, labels, value in snap["sum"]:
                key = (name, tuple((k, v) for k, v in labels))
                merged[key] = merged.get(key, 0.0) + value
            for name, labels, value in snap["max"]:
                key = (name, tuple((k, v) for k, v in labels))
                merged[key] = max(merged.get(key, value), value)
        merged[("gateway_workers", ())] = float(len(snaps))
        families = {name: Metric(name, help_, typ) for name, (typ, help_, _) in FAMILIES.items()}
        for (sample, labels), value in merged.items():  # in order: histogram buckets stay sorted
            families[_family_of(sample)].add_sample(sample, dict(labels), value)
        yield from (f for f in families.values() if f.samples)
        yield from process_families(snaps) if self.metrics.snapshot_dir is not None else ()


def _family_of(sample: str) -> str:
    if sample in FAMILIES:
        return sample
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in FAMILIES:
            return sample[: -len(suffix)]
    raise KeyError(sample)


def init_app(app: Flask) -> Metrics:
    """Count what the hub and the admission path report; /metrics is in gateway/operator.py."""
    st = state(app)
    server = st.config.server
    shared = server.metrics_dir  # several workers: the parent made one for them (gateway/workers.py)
    metrics = Metrics(st.hub, lambda: st.sources, shared, server.metrics_port)
    st.parts[Metrics] = metrics
    st.hub.observer = metrics
    st.services.append(metrics)
    if shared:  # several workers: /channels asks every one for its subscriber counts
        survey = Survey(shared, lambda: st.admission.subscriptions() if st.admission is not None else {})
        st.parts[Survey] = survey
        st.services.append(survey)
    return metrics
