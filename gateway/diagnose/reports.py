"""Shared diagnoses: POST /diagnose/reports keeps what a browser found, GET lists them for the operator.

A person who ran /diagnose can send the verdict here. The operator (behind server.operator_token)
sees the reports, a page at a time, and across all of them the share in which each transport
worked (one vote per client: its newest report), which tells them what their users' networks let
through. What is kept is a compact copy (known fields, bounded strings), stored as its JSON bytes
and bounded in bytes as well as in count (diagnose.max_reports, oldest dropped first); with
redis.url set the reports also go to Redis, so every gateway process sees them all.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, render_template, request

from gateway.bodies import read_limited
from gateway.clients import client_address
from gateway.config import Config
from gateway.diagnose.probes import RateLimit
from gateway.errors import BadRequest
from gateway.operator import check_operator_token
from gateway.state import state

__all__ = [
    "bp",
    "init_app",
    "Reports",
    "TRANSPORTS",
    "MAX_REPORT_BYTES",
    "validate",
    "compact",
    "summarize",
    "aggregate",
]

log = logging.getLogger(__name__)

bp = Blueprint("diagnose_reports", __name__)

TRANSPORTS = ("websocket", "sse", "long_poll", "short_poll")
LABELS = {"websocket": "WebSocket", "sse": "Server-Sent Events", "long_poll": "long poll", "short_poll": "short poll"}
STATUSES = ("ok", "degraded", "broken")
# What a sender may send; what is kept is compact() of it, at most MAX_KEPT_BYTES, and all the
# kept reports together at most MAX_STORE_BYTES (whichever of it and max_reports bites first).
MAX_REPORT_BYTES = 32 * 1024
MAX_KEPT_BYTES = 8 * 1024
MAX_STORE_BYTES = 4 * 1024 * 1024
PER_PAGE, MAX_PER_PAGE = 50, 200
REDIS_KEY = "diagnose:reports"  # after redis.prefix, beside the hub's "<prefix>c:<channel>" keys
# Per client address: a burst of 30, then one every 10 s. Generous for people behind one proxy,
# but one sender cannot push everyone else's reports out in a moment.
REPORT_BURST, REPORTS_PER_S = 30.0, 0.1


class _ReportLimit(RateLimit):
    """The reports' own per-client rate limit (apart from the probes')."""


def init_app(app: Flask) -> None:
    """Create the report store for this app and register the routes."""
    st = state(app)
    st.parts[Reports] = Reports.from_config(st.config)
    st.parts[_ReportLimit] = _ReportLimit(rate=REPORTS_PER_S, burst=REPORT_BURST)
    app.register_blueprint(bp)


# -- pure functions: checking, summarising and counting reports ----------------------------------
def validate(payload: Any) -> dict[str, Any]:
    """The submitted diagnosis if it has the contract's shape, else BadRequest naming what is wrong.

    Transports it does not name count as not tested; keys beyond the contract's are kept as sent."""
    if not isinstance(payload, dict):
        raise BadRequest("invalid_report", "a report is the diagnosis JSON object (window.__diagnosis)")
    transports = payload.get("transports")
    if not isinstance(transports, dict):
        raise BadRequest("invalid_report", 'a report needs "transports": an object keyed by transport name')
    known = [name for name in TRANSPORTS if name in transports]
    if not known:
        raise BadRequest("invalid_report", f'"transports" names none of: {", ".join(TRANSPORTS)}')
    for name in known:
        entry = transports[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("ok"), bool):
            raise BadRequest("invalid_report", f'transports.{name} must be an object with "ok": true or false')
    recommended = payload.get("recommended")
    if recommended is not None and recommended not in TRANSPORTS:
        raise BadRequest("invalid_report", f'"recommended" must be null or one of: {", ".join(TRANSPORTS)}')
    return payload


def transport_status(entry: dict[str, Any]) -> str:
    """ok / degraded / broken: the page's own status when it gives one, else derived from ok."""
    status = entry.get("status")
    if status in STATUSES:
        return status
    if entry.get("ok"):
        return "ok"
    return "degraded" if entry.get("buffered") else "broken"


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return value


# Per transport, the fields kept and how: text (bounded), number, flag.
_KEPT_TRANSPORT = {
    "reason": 300,
    "fix": 600,
    "latency_ms": None,
    "cut_after_s": None,
    "idle_limit_s": None,
    "buffered": bool,
}


def compact(diagnosis: dict[str, Any]) -> dict[str, Any]:
    """The part of a validated diagnosis that is kept: known fields of known types, strings cut
    short, so a report's size in memory is bounded whatever was sent (32 KB of `[],[],...`
    expands twentyfold as Python objects)."""
    transports: dict[str, Any] = {}
    for name in TRANSPORTS:
        entry = diagnosis["transports"].get(name)
        if not isinstance(entry, dict):
            continue
        kept: dict[str, Any] = {"ok": entry["ok"], "status": transport_status(entry)}
        for key, how in _KEPT_TRANSPORT.items():
            value = entry.get(key)
            if how is bool:
                value = value if isinstance(value, bool) else None
            elif isinstance(how, int):
                value = _text(value, how)
            else:
                value = _number(value)
            if value is not None:
                kept[key] = value
        findings = entry.get("findings")
        if isinstance(findings, list):
            kept["findings"] = [f[:40] for f in findings[:8] if isinstance(f, str)]
        transports[name] = kept
    out: dict[str, Any] = {"transports": transports, "recommended": diagnosis.get("recommended")}
    for key, limit in (("summary", 300), ("mode", 16), ("source", 16), ("started", 40)):
        if (value := _text(diagnosis.get(key), limit)) is not None:
            out[key] = value
    path = diagnosis.get("path")
    if isinstance(path, dict):
        kept_path: dict[str, Any] = {}
        if isinstance(path.get("proxy"), bool):
            kept_path["proxy"] = path["proxy"]
        for key in ("platform", "browser_protocol"):
            if (value := _text(path.get(key), 40)) is not None:
                kept_path[key] = value
        for key in ("idle_limit_s", "lifetime_limit_s"):
            if (value := _number(path.get(key))) is not None:
                kept_path[key] = value
        warnings = path.get("warnings")
        if isinstance(warnings, list):
            kept_path["warnings"] = [w[:300] for w in warnings[:6] if isinstance(w, str)]
        out["path"] = kept_path
    return out


def summarize(diagnosis: dict[str, Any], *, client: str, forwarded_for: str, user_agent: str, now: float) -> dict:
    """The record we keep: who sent it (the gateway's client identity), when, per transport its
    status, and the compact diagnosis."""
    kept = compact(diagnosis)
    return {
        "time": round(now, 3),
        "client": client[:64],
        "forwarded_for": forwarded_for[:200],
        "user_agent": user_agent[:300],
        "recommended": kept["recommended"],
        "transports": {name: t["status"] for name, t in kept["transports"].items()},
        "diagnosis": kept,
    }


def aggregate(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Across reports, one vote per client (its newest report; `reports` is newest first): per
    transport how many tested it and in how many it was ok / degraded / broken, the share in which
    it worked, and how often each transport was recommended. A sender who repeats a report, or
    forges many, still moves the figures by one vote."""
    per: dict[str, dict[str, Any]] = {name: {"tested": 0, **dict.fromkeys(STATUSES, 0)} for name in TRANSPORTS}
    recommended: dict[str, int] = {name: 0 for name in TRANSPORTS} | {"none": 0}
    voters: set[Any] = set()
    for report in reports:
        voter = report.get("client")
        if voter in voters:
            continue
        voters.add(voter)
        for name, status in report.get("transports", {}).items():
            if name in per and status in STATUSES:
                per[name]["tested"] += 1
                per[name][status] += 1
        choice = report.get("recommended")
        recommended[choice if choice in TRANSPORTS else "none"] += 1
    for counts in per.values():
        counts["share_ok"] = round(counts["ok"] / counts["tested"], 4) if counts["tested"] else None
    times = [r["time"] for r in reports if isinstance(r.get("time"), (int, float))]
    return {
        "reports": len(reports),
        "clients": len(voters),
        "first": min(times) if times else None,
        "last": max(times) if times else None,
        "transports": per,
        "recommended": recommended,
    }


# -- storage ---------------------------------------------------------------------------------------
class Reports:
    """The newest `limit` reports (and at most `max_bytes` of them) in memory, each kept as its
    compact JSON bytes; with a Redis URL also in one capped Redis list, which is what listing reads
    (so all processes agree) unless Redis is down, when memory answers."""

    def __init__(
        self,
        limit: int,
        redis_url: str = "",
        prefix: str = "gw:",
        tls_verify: bool = True,
        max_bytes: int = MAX_STORE_BYTES,
    ) -> None:
        self.limit, self.max_bytes = limit, max_bytes
        self._memory: deque[bytes] = deque()
        self.kept_bytes = 0
        self._lock = threading.Lock()
        self._key = prefix + REDIS_KEY
        self._redis: Any = None
        if redis_url and limit:
            import redis  # imported lazily: Redis is optional

            options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
            if redis_url.startswith("rediss://") and not tls_verify:
                options["ssl_cert_reqs"] = "none"
            # At most two connections of its own, so reports never eat into a small plan's client cap.
            pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=2, timeout=2, **options)
            self._redis = redis.Redis(connection_pool=pool)

    @classmethod
    def from_config(cls, config: Config) -> Reports:
        r = config.redis
        return cls(config.diagnose.max_reports, r.url, r.prefix, r.tls_verify)

    @property
    def shared(self) -> bool:
        return self._redis is not None

    def add(self, record: dict[str, Any]) -> bool:
        """Keep a record; True when it also reached Redis, where every gateway process sees it."""
        data = json.dumps(record, separators=(",", ":")).encode()
        if len(data) > MAX_KEPT_BYTES:  # compact() bounds it already; this is the backstop
            raise BadRequest("too_large", f"a kept report may be at most {MAX_KEPT_BYTES} bytes", 413)
        with self._lock:
            self._memory.append(data)
            self.kept_bytes += len(data)
            while self._memory and (len(self._memory) > self.limit or self.kept_bytes > self.max_bytes):
                self.kept_bytes -= len(self._memory.popleft())
        if self._redis is None:
            return False
        try:
            pipe = self._redis.pipeline()
            pipe.lpush(self._key, data)
            pipe.ltrim(self._key, 0, self.limit - 1)
            pipe.execute()
            return True
        except Exception as exc:  # redis errors, timeouts: the report is still in memory
            log.warning("diagnose reports: Redis write failed (%s); kept in this process only", exc)
            return False

    def newest_first(self) -> tuple[list[dict[str, Any]], str]:
        """The reports, newest first, and where they came from ("redis" or "memory")."""
        if self._redis is not None:
            try:
                raw = self._redis.lrange(self._key, 0, self.limit - 1)
                return [r for r in (_loads(item) for item in raw) if r is not None], "redis"
            except Exception as exc:
                log.warning("diagnose reports: Redis read failed (%s); showing this process's copy", exc)
        with self._lock:
            kept = list(reversed(self._memory))
        return [r for r in (_loads(item) for item in kept) if r is not None], "memory"


def _loads(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _reports() -> Reports:
    return state().part(Reports)


# -- routes ----------------------------------------------------------------------------------------
@bp.post("/diagnose/reports")
def submit() -> tuple[Response, int]:
    reports = _reports()
    if reports.limit == 0:
        raise BadRequest(
            "reports_off",
            "this gateway keeps no reports (diagnose.max_reports = 0); ask its operator to set diagnose.max_reports",
            403,
        )
    client = client_address(request.environ, state().trusted)
    if not state().part(_ReportLimit).allow(client):
        raise BadRequest("too_many_reports", "too many reports from this address; try again in a minute", 429)
    diagnosis = validate(_read_json(MAX_REPORT_BYTES))
    record = summarize(
        diagnosis,
        client=client,
        forwarded_for=request.headers.get("X-Forwarded-For", "")[:200],
        user_agent=request.headers.get("User-Agent", "")[:300],
        now=time.time(),
    )
    shared = reports.add(record)
    return jsonify(stored=True, shared=shared, recommended=record["recommended"], transports=record["transports"]), 201


@bp.get("/diagnose/reports")
def listing() -> Response:
    _check_operator()
    records, source = _reports().newest_first()
    summary = aggregate(records)
    page = _page_args(len(records))
    shown = records[page["offset"] : page["offset"] + page["per_page"]]
    del page["offset"]
    if _wants_json():
        body = {"summary": summary, "source": source, "limit": _reports().limit, **page, "reports": shown}
        response = jsonify(body)
    else:
        response = Response(_html(summary, shown, source, page), mimetype="text/html")
    # Client addresses and, with ?token=, the token itself: keep it out of shared caches.
    response.headers["Cache-Control"] = "no-store"
    return response


def _page_args(total: int) -> dict[str, int]:
    """?page=N (from 1) and ?per_page=M (1-200): which slice of the newest-first list to show."""
    values = {}
    for name, default, high in (("page", 1, 1_000_000), ("per_page", PER_PAGE, MAX_PER_PAGE)):
        raw = request.args.get(name, "")
        try:
            values[name] = int(raw) if raw else default
        except ValueError:
            values[name] = 0
        if not 1 <= values[name] <= high:
            raise BadRequest(f"invalid_{name}", f"{name} must be a whole number from 1 to {high}")
    pages = max(1, -(-total // values["per_page"]))
    return {**values, "pages": pages, "total": total, "offset": (values["page"] - 1) * values["per_page"]}


def _html(summary: dict[str, Any], records: list[dict[str, Any]], source: str, page: dict[str, int]) -> str:
    token = request.args.get("token", "")
    return render_template(
        "diagnose_reports.html",
        summary=summary,
        reports=records,
        page=page,
        source=source,
        limit=_reports().limit,
        transports=TRANSPORTS,
        labels=LABELS,
        token=token,
        fmt_time=_fmt_time,
    )


def _read_json(limit: int) -> Any:
    raw = read_limited(limit, f"a report may be at most {limit} bytes of JSON")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("invalid_json", "the body must be the diagnosis as JSON text (UTF-8)") from None


def _check_operator() -> None:
    expected = state().config.server.operator_token
    if not expected:
        raise BadRequest(
            "operator_view_off",
            "the report view is off because no operator token is configured; "
            "set GATEWAY_OPERATOR_TOKEN (or server.operator_token in config.toml) and open "
            "/diagnose/reports?token=<token> or send 'Authorization: Bearer <token>'",
            403,
        )
    check_operator_token(expected)


def _wants_json() -> bool:
    fmt = request.args.get("format", "")
    if fmt:
        if fmt not in ("json", "html"):
            raise BadRequest("invalid_format", "format must be json or html")
        return fmt == "json"
    # Browsers and */* get the page; a client that asks for JSON first gets JSON.
    return request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"


def _fmt_time(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
