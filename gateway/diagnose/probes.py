"""The /diagnose page and the helper endpoints its probes (and the CLI) call.

Probes run over the real transport routes on fresh `diag.*` channels. The helpers here only
ever publish onto such channels, without the publish token, so they are bounded: small
server-made payloads, a few events per burst, a per-client rate limit and a cap on bursts in
flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, render_template, request

from gateway.clients import client_address
from gateway.diagnose import DIAG_PREFIX, is_diag_channel
from gateway.diagnose.facts import path_facts, request_record
from gateway.diagnose.plan import PLAN, REAL_PREFIX
from gateway.diagnose.verdict import verdict
from gateway.errors import BadRequest
from gateway.limits import TokenBuckets
from gateway.names import check_channel
from gateway.state import state
from gateway.transports.common import config, hub

__all__ = ["bp", "init_app", "RateLimit"]

bp = Blueprint("diagnose", __name__)

MAX_BURST = 20
MAX_GAP_MS = 2000
MAX_DELAY_MS = 5_000  # the plan waits at most a second or so; longer only ties a burst up
MAX_SPAN_MS = 10_000  # delay + the whole burst: a burst never lives longer than this
MAX_IN_FLIGHT = 200  # bursts scheduled at once, across all clients
# Per client (gateway.clients identity: X-Forwarded-For only from a trusted proxy). One run of
# the plan has at most a handful in flight; this leaves room for a few tabs and re-runs, and
# MAX_IN_FLIGHT // MAX_IN_FLIGHT_PER_CLIENT clients would be needed to fill the global cap.
MAX_IN_FLIGHT_PER_CLIENT = 12
MAX_VERDICT_BYTES = 256 * 1024
MIN_HOLD_S = 1.0
MAX_HOLD_S = 600.0
_TRANSPORT_PATHS = {"/poll/": "short_poll", "/longpoll/": "long_poll", "/sse/": "sse", "/ws/": "websocket"}


class RateLimit(TokenBuckets):
    """Token bucket per client address: `burst` at once, refilled at `rate` per second."""

    def __init__(self, rate: float = 5.0, burst: float = 60.0, max_clients: int = 10_000) -> None:
        super().__init__(rate, burst, max_clients)

    def allow(self, client: str, now: float | None = None) -> bool:
        return self.take(client, now) == 0


class SeenLog:
    """The last few probe requests per diag channel as they arrived (Upgrade header, HTTP
    version...), so a WebSocket that failed in the browser can be explained. Bounded."""

    def __init__(self, max_channels: int = 2000, per_channel: int = 10) -> None:
        self.max_channels, self.per_channel = max_channels, per_channel
        self._log: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, channel: str, record: dict[str, Any]) -> None:
        with self._lock:
            records = self._log.pop(channel, [])
            records = (records + [record])[-self.per_channel :]
            self._log[channel] = records
            while len(self._log) > self.max_channels:
                self._log.popitem(last=False)

    def get(self, channel: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._log.get(channel, []))


@dataclass
class ProbeState:
    """What the probe endpoints keep per app."""

    share_script: Path
    limit: RateLimit = field(default_factory=RateLimit)
    seen: SeenLog = field(default_factory=SeenLog)
    in_flight: int = 0  # bursts scheduled right now, across all clients
    per_client: dict[str, int] = field(default_factory=dict)  # bursts in flight per client
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, client: str) -> str | None:
        """Take a burst slot for `client`; the refusal's error code when none is free."""
        with self.lock:
            if self.per_client.get(client, 0) >= MAX_IN_FLIGHT_PER_CLIENT:
                return "busy_client"
            if self.in_flight >= MAX_IN_FLIGHT:
                return "busy"
            self.in_flight += 1
            self.per_client[client] = self.per_client.get(client, 0) + 1
            return None

    def release(self, client: str) -> None:
        with self.lock:
            self.in_flight -= 1
            left = self.per_client.get(client, 1) - 1
            if left > 0:
                self.per_client[client] = left
            else:
                self.per_client.pop(client, None)


def init_app(app: Flask) -> None:
    probe = ProbeState(share_script=Path(app.static_folder or "static") / "diagnose-share.js")
    state(app).parts[ProbeState] = probe
    app.register_blueprint(bp)

    def _record_probe_request() -> None:
        for prefix, transport in _TRANSPORT_PATHS.items():
            if request.path.startswith((prefix + DIAG_PREFIX, prefix + REAL_PREFIX)):
                channel = request.path[len(prefix) :]
                record = request_record(request, transport)
                record["t_ms"] = int(time.time() * 1000)
                probe.seen.add(channel[:128], record)
                g.diag_record = record
                return

    @app.after_request
    def _record_answer(response: Response) -> Response:
        # The same dict sits in the SeenLog: what the gateway answered (403 origin, 426, ...).
        record = g.pop("diag_record", None)
        if record is not None:
            record["status"] = response.status_code
            if response.status_code >= 400 and response.mimetype == "application/json":
                body = response.get_json(silent=True)
                record["error"] = body.get("error") if isinstance(body, dict) else None
        return response

    # First in line, so requests that a later check (origin, bad input) refuses are recorded too.
    app.before_request_funcs.setdefault(None, []).insert(0, _record_probe_request)


def _state() -> ProbeState:
    return state().part(ProbeState)


def client_key() -> str:
    """The gateway's one client identity (the socket peer, or what a trusted proxy names): a
    forged X-Forwarded-For from anywhere else changes nothing."""
    return client_address(request.environ, state().trusted)


def _rate_limited() -> None:
    if not _state().limit.allow(client_key()):
        raise BadRequest("rate_limited", "too many diagnostic requests from this client; wait a few seconds", 429)


def _diag_channel(value: str | None) -> str:
    channel = check_channel(value or "")
    if not is_diag_channel(channel):
        raise BadRequest("not_diagnostic", f"diagnostic helpers only publish to channels starting with {DIAG_PREFIX!r}")
    return channel


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("invalid_argument", f"{name} must be a whole number from {low} to {high}") from None
    if not low <= value <= high:
        raise BadRequest("invalid_argument", f"{name} must be a whole number from {low} to {high}")
    return value


def hold_arg(default: float) -> float:
    """?hold=<s> for short test runs; bounded so a URL cannot make the page hang for hours."""
    raw = request.args.get("hold")
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        return default
    if value != value:  # NaN
        return default
    return max(MIN_HOLD_S, min(MAX_HOLD_S, value))


@bp.get("/diagnose")
@bp.get("/diagnose/")
def page() -> str:
    cfg = config().diagnose
    thorough = request.args.get("mode") == "thorough"
    default = cfg.thorough_hold_s if thorough else cfg.hold_s
    hold = hold_arg(default)
    mode = "thorough" if thorough else ("quick" if hold == cfg.hold_s else "custom")
    return render_template(
        "diagnose.html",
        hold=hold,
        mode=mode,
        quick_hold=cfg.hold_s,
        thorough_hold=cfg.thorough_hold_s,
        plan=PLAN,
        share_script=_state().share_script.exists(),
        # Relative, so the page still works where a proxy mounts the gateway under a path prefix.
        static="../static/" if request.path.endswith("/") else "static/",
    )


@bp.get("/diagnose/facts")
def facts() -> Response:
    cfg = config()
    body = path_facts(request, client_key())
    body["gateway"] = {
        "sse_heartbeat_s": cfg.sse.heartbeat_s,
        "sse_padding_bytes": cfg.sse.padding_bytes,
        "websocket_ping_s": cfg.websocket.ping_s,
        "longpoll_max_timeout_s": cfg.poll.longpoll_max_timeout_s,
        "hold_s": cfg.diagnose.hold_s,
        "thorough_hold_s": cfg.diagnose.thorough_hold_s,
        "time_ms": int(time.time() * 1000),
    }
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response


# GET too: the page falls back to it where something on the path refuses POSTs.
@bp.route("/diagnose/burst", methods=["GET", "POST"])
def burst() -> tuple[Response, int]:
    """Publish n events `gap_ms` apart onto a diag channel, the first after `delay_ms`. Each
    event's data carries its sequence number and server send time, so a client can compare
    arrival spacing with send spacing."""
    _rate_limited()
    channel = _diag_channel(request.args.get("channel"))
    n = _int_arg("n", 5, 1, MAX_BURST)
    gap_ms = _int_arg("gap_ms", 300, 0, MAX_GAP_MS)
    delay_ms = _int_arg("delay_ms", 0, 0, MAX_DELAY_MS)
    tag = "".join(c for c in request.args.get("tag", "burst")[:32] if c.isalnum() or c in "-_") or "burst"
    if delay_ms + (n - 1) * gap_ms > MAX_SPAN_MS:
        raise BadRequest("invalid_argument", f"delay_ms + (n - 1) * gap_ms must be at most {MAX_SPAN_MS}")
    probe, client = _state(), client_key()
    refused = probe.reserve(client)
    if refused == "busy_client":
        raise BadRequest("busy", "this client has too many diagnostic bursts in flight; wait a few seconds", 429)
    if refused:
        raise BadRequest("busy", "too many diagnostic bursts in flight; try again in a few seconds", 503)
    gateway = hub()

    def run() -> None:
        try:
            start = time.monotonic() + delay_ms / 1000
            for seq in range(n):
                pause = start + seq * gap_ms / 1000 - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                if gateway.closing:
                    return
                data = json.dumps({"seq": seq, "n": n, "tag": tag, "sent_ms": int(time.time() * 1000)})
                gateway.publish(channel, data, tag)
        finally:
            probe.release(client)

    threading.Thread(target=run, daemon=True, name=f"diag-burst-{channel}").start()
    body = {"channel": channel, "n": n, "gap_ms": gap_ms, "delay_ms": delay_ms, "tag": tag}
    body["server_ms"] = int(time.time() * 1000)
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response, 202


@bp.get("/diagnose/seen")
def seen() -> Response:
    # Real-channel checks too: a browser never shows why a WebSocket handshake was refused.
    value = request.args.get("channel") or ""
    channel = check_channel(value) if value.startswith(REAL_PREFIX) else _diag_channel(value)
    response = jsonify(channel=channel, requests=_state().seen.get(channel))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/diagnose/verdict")
def compute_verdict() -> Response:
    """Raw probe results in, the verdict out: the page and the CLI share gateway.diagnose.verdict."""
    _rate_limited()
    if request.content_length is not None and request.content_length > MAX_VERDICT_BYTES:
        raise BadRequest("too_large", f"probe results are limited to {MAX_VERDICT_BYTES} bytes", 413)
    raw = request.get_data(cache=False)[: MAX_VERDICT_BYTES + 1]
    if len(raw) > MAX_VERDICT_BYTES:
        raise BadRequest("too_large", f"probe results are limited to {MAX_VERDICT_BYTES} bytes", 413)
    try:
        results = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        raise BadRequest("invalid_json", "send the raw probe results as a JSON object") from None
    if not isinstance(results, dict):
        raise BadRequest("invalid_json", "send the raw probe results as a JSON object")
    return jsonify(verdict(results))
