"""What the admission path reports (gateway/admission.py's Observer) goes to the metrics and the
connection log: one object, installed as state().admission.observer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

from gateway.admission import Observer, Ticket
from gateway.bodies import drain
from gateway.connlog import ConnectionLog
from gateway.metrics import Metrics
from gateway.state import state

__all__ = ["AdmissionReport", "PublishRefusals", "init_app", "LIMIT_CODES"]

# Refusal codes of admission and limits -> the limit key that refused (gateway_limit_hits_total).
LIMIT_CODES = {
    "too_many_connections": "max_connections",
    "too_many_connections_from_client": "max_connections_per_client",
    "too_many_channels": "max_channels_per_connection",
    "channel_full": "max_subscribers_per_channel",
    "connecting_too_fast": "connect_rate_per_client",
    "too_many_channels_alive": "max_channels",
    "publishing_too_fast": "publish_rate_per_token",
}
POLLS = frozenset({"poll", "longpoll"})
LOGGED = frozenset({"longpoll", "sse", "ws"})  # held connections; a short poll is a request (access log)


class AdmissionReport(Observer):
    def __init__(self, metrics: Metrics, connections: ConnectionLog) -> None:
        self.metrics = metrics
        self.connections = connections

    def connection_opened(self, transport: str) -> None:
        self.metrics.connection_opened(transport)

    def connection_closed(self, ticket: Ticket, reason: str) -> None:
        duration = time.monotonic() - ticket.opened_at
        transport = ticket.transport
        events, nbytes = ticket.events_sent, ticket.bytes_sent
        if transport in POLLS:  # streams are counted as they write (hub.observer); polls here
            self.metrics.polled(transport, events, nbytes)
        self.metrics.connection_closed(transport, reason, duration, events, nbytes)
        if reason == "slow_consumer":  # cut for its unsent backlog (limits.slow_consumer_bytes)
            self.metrics.slow_consumer_dropped(transport)
            self.metrics.limit_hit("slow_consumer_bytes")
        if transport in LOGGED and self.connections.enabled:
            self.connections.log_connection_end(
                transport=transport,
                channels=ticket.channels,
                client=ticket.client,
                duration_s=duration,
                events=events,
                nbytes=nbytes,
                reason=reason,
                sub=ticket.principal.sub or None,
            )

    def refused(self, transport: str, status: int, reason: str) -> None:
        self.metrics.refused(status, reason)
        limit = LIMIT_CODES.get(reason)
        if limit is not None:
            self.metrics.limit_hit(limit)


class PublishRefusals:
    """WSGI middleware around the whole app: publishes refused (any status from 400 on), by
    status and error code. Publishing has no observer of its own, and its fast path answers
    without Flask; an error body is small JSON that names the code."""

    def __init__(self, app: Callable[..., Any], metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or not environ.get("PATH_INFO", "").startswith("/publish/"):
            return self.app(environ, start_response)
        statuses: list[str] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        result = self.app(environ, start)
        if not statuses or statuses[0][:1] not in ("4", "5"):
            return result
        body = drain(result)
        self._count(int(statuses[0][:3]), body)
        return [body]

    def _count(self, status: int, body: bytes) -> None:
        try:
            code = json.loads(body).get("error")
        except (ValueError, AttributeError):
            code = None
        self.count(status, str(code or "error"))

    def count(self, status: int, code: str) -> None:
        """One publish refused with `status` and error `code` (also called by the lean loop)."""
        code = code[:64]
        self.metrics.publish_refused(status, code)
        limit = LIMIT_CODES.get(code)
        if limit is not None:
            self.metrics.limit_hit(limit)


def init_app(app: Flask) -> AdmissionReport:
    """Install the report on the admission path, and count publish refusals; call it after
    every blueprint is registered, so that the middleware sees every publish."""
    st = state(app)
    metrics = st.part(Metrics)
    report = AdmissionReport(metrics, st.part(ConnectionLog))
    if st.admission is not None:
        st.admission.observer = report
    refusals = st.parts[PublishRefusals] = PublishRefusals(app.wsgi_app, metrics)
    app.wsgi_app = refusals  # type: ignore[method-assign]
    return report
