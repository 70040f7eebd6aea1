"""The operator's views: GET /metrics (Prometheus), GET /channels and GET /channels/<name>.

With server.operator_token set, each needs it (`Authorization: Bearer <token>` or `?token=`);
without one they are open, as the contract says, so put them behind the token (or a proxy
rule) before the gateway faces the internet.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from gateway.errors import BadRequest
from gateway.hub import Event
from gateway.metrics import Metrics
from gateway.names import check_channel
from gateway.state import State, state
from gateway.survey import Survey

__all__ = ["bp", "init_app", "require_operator", "channel_info", "subscribers_of"]

bp = Blueprint("operator", __name__)

RATE_WINDOW_S = 60.0
LIST_DEFAULT = 1000
LIST_MAX = 10_000
STREAM_TRANSPORTS = ("sse", "ws", "longpoll")


def require_operator() -> None:
    """Refuse (401) a request without the operator token, when one is configured."""
    expected = state().config.server.operator_token
    if expected:
        check_operator_token(expected)


def check_operator_token(expected: str) -> None:
    """The operator token, as Bearer or ?token=, compared in constant time; else 401."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = request.args.get("token", "")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise BadRequest(
            "unauthorized", "send the operator token as 'Authorization: Bearer <token>' or as ?token=<token>", 401
        )


@bp.before_request
def _operator_only() -> None:
    require_operator()


@bp.after_request
def _no_store(response: Response) -> Response:
    # Counts and channel names are the operator's, and ?token= may be in the URL.
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/metrics")
def metrics() -> Response:
    metrics = state().part(Metrics)
    if metrics.port:  # the operator moved it off the public port
        raise BadRequest("not_found", "metrics are served on 127.0.0.1 at server.metrics_port, not here", 404)
    body, content_type = metrics.exposition(request.headers.get("Accept", ""))
    return Response(body, content_type=content_type)


@bp.get("/channels")
def channels() -> Response:
    st = state()
    raw = request.args.get("limit", str(LIST_DEFAULT))
    limit = int(raw) if raw.isdigit() else 0
    if not 1 <= limit <= LIST_MAX:
        raise BadRequest("invalid_limit", f"limit must be a whole number from 1 to {LIST_MAX}")
    names = st.hub.channels()
    across = _across_workers(st)
    listed = []
    for name in names[:limit]:
        subscribers = subscribers_of(st, name, across)
        listed.append({"channel": name, "subscribers": subscribers, "subscribers_total": st.hub.subscribers(name)})
    return jsonify(channels=listed, count=len(names), truncated=len(names) > limit)


@bp.get("/channels/", defaults={"name": ""})
@bp.get("/channels/<path:name>")
def channel(name: str) -> Response:
    check_channel(name)
    return jsonify(channel_info(state(), name))


def subscribers_of(st: State, channel: str, across: dict[str, dict[str, int]] | None = None) -> dict[str, int]:
    """Subscribers of `channel` by transport, as the admission path counts them: in every
    worker of this gateway (`across`, or asked for here), or in this process when it is the
    only one."""
    if across is None:
        across = _across_workers(st)
    if across is not None:
        counts = across.get(channel, {})
    else:
        counts = st.admission.subscribers(channel) if st.admission is not None else {}
    return {t: counts.get(t, 0) for t in STREAM_TRANSPORTS}


def _across_workers(st: State) -> dict[str, dict[str, int]] | None:
    """With several workers, every worker's counts (gateway/survey.py); None when this process
    is all there is."""
    survey = st.parts.get(Survey)
    return survey.everywhere() if survey is not None else None


def channel_info(st: State, channel: str, now: float | None = None) -> dict[str, Any]:
    """The contract's {"channel", "last_id", "history", "subscribers"} and a publish rate. The
    history is read from the store, so with Redis it covers every process."""
    size = st.config.history.size
    batch = st.hub.read(channel, "0-0", size)
    events = batch.events
    last_id = events[-1].id if events else st.hub.last_id(channel)
    return {
        "channel": channel,
        "last_id": last_id,
        "history": {
            "count": len(events),
            "bytes": sum(len(e.data.encode("utf-8", "surrogatepass")) for e in events),
            "limit": size,
            "oldest_id": events[0].id if events else None,
            "oldest_time": events[0].time if events else None,
        },
        "subscribers": subscribers_of(st, channel),
        "subscribers_total": st.hub.subscribers(channel),
        "publish_rate": _rate(events, size, time.time() if now is None else now),
    }


def _rate(events: list[Event], size: int, now: float) -> dict[str, Any]:
    """Events per second over the last minute, from the publish times in the history. When the
    history holds less than a minute (it is full), the rate is over the span it does hold."""
    recent = [e for e in events if e.time >= now - RATE_WINDOW_S]
    window = RATE_WINDOW_S
    if len(events) >= size and events and events[0].time > now - RATE_WINDOW_S:
        window = max(1.0, now - events[0].time)
    return {"events": len(recent), "window_s": round(window, 3), "per_s": round(len(recent) / window, 3)}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
