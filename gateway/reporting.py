"""What the admission path reports (gateway/admission.py's Observer) goes to the metrics and the
connection log: one object, installed as state().admission.observer."""

from __future__ import annotations

import time

from flask import Flask, Response, request

from gateway.admission import Observer, Ticket
from gateway.connlog import ConnectionLog
from gateway.metrics import Metrics
from gateway.state import state

__all__ = ["AdmissionReport", "init_app", "LIMIT_CODES"]

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
        if transport in LOGGED:
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


def init_app(app: Flask) -> AdmissionReport:
    st = state(app)
    metrics = st.part(Metrics)
    report = AdmissionReport(metrics, st.part(ConnectionLog))
    if st.admission is not None:
        st.admission.observer = report

    @app.after_request
    def count_publish_refusals(response: Response) -> Response:
        # Publishing has no observer of its own: its error answers carry the code.
        if response.status_code >= 400 and request.blueprint == "publish":
            body = response.get_json(silent=True)
            code = body.get("error") if isinstance(body, dict) else None
            metrics.publish_refused(response.status_code, str(code or "error")[:64])
            limit = LIMIT_CODES.get(str(code))
            if limit is not None:
                metrics.limit_hit(limit)
        return response

    return report
