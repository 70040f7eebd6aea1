"""Rules: evidence in, findings out. Each transport's rule returns its status ("ok" | "degraded"
| "broken"), the finding codes that explain it (worded by advice.py), the numbers the wording
needs, and the measurements shown beside it. No sentences here."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from gateway.diagnose.verdict.advice import config_lines
from gateway.diagnose.verdict.evidence import (
    SLOW_MS,
    Evidence,
    RealCheck,
    analyse_burst,
    cut,
    num,
    obj,
    queued_ms,
    records,
)

__all__ = ["Outcome", "RULES", "real_channel", "lifetime", "LIFETIME_SPREAD_S"]

LIFETIME_SPREAD_S = 0.6  # cuts this close together after opening, one of them busy: a lifetime cap


@dataclass
class Outcome:
    status: str
    codes: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, code: str, status: str | None = None, **params: Any) -> None:
        self.codes.append(code)
        self.params.update(params)
        if status is not None:
            self.status = status


def _out(level: str, code: str, extra: dict[str, Any], **params: Any) -> Outcome:
    return Outcome(level, [code], params, extra)


def _idle(p: dict[str, Any], key: str, cut_s: float | None) -> float | None:
    idle = num(p.get(key))
    return round(idle, 1) if cut_s is not None and idle is not None else None


def _not_tested(burst: dict[str, Any], extra: dict[str, Any]) -> Outcome:
    return _out("broken", "not_tested", extra, publish_error=burst.get("publish_error"))


# The keepalive setting that keeps each stream open through an idle limit, and its value in ctx.
_KEEPALIVE = {"sse": ("sse.heartbeat_s", "sse_heartbeat_s"), "websocket": ("websocket.ping_s", "websocket_ping_s")}


def _keepalive(kind: str, limit: float, ctx: dict[str, Any]) -> dict[str, Any]:
    """What the keepalive fix needs: the setting, its value now, the config lines."""
    key, ctx_key = {
        "sse": ("sse.heartbeat_s", "sse_heartbeat_s"),
        "websocket": ("websocket.ping_s", "websocket_ping_s"),
    }[kind]
    return {
        "limit": limit,
        "keepalive_key": key,
        "keepalive_value": ctx.get(ctx_key),
        "config": config_lines(kind, limit),
    }


# -- short poll ---------------------------------------------------------------------------------
def short_poll(p: dict[str, Any], ev: Evidence) -> Outcome:
    polls = records(p.get("polls"))
    good = [x for x in polls if x.get("status") == 200 and x.get("json")]
    rtts = [v for v in (num(x.get("ms")) for x in good) if v is not None]
    rtt = round(statistics.median(rtts), 1) if rtts else None
    extra = {"latency_ms": rtt, "requests": len(polls)}
    bad = next((x for x in polls if not (x.get("status") == 200 and x.get("json"))), None)
    if not good:
        return _out("broken", "sp.request_failed", extra, failure=bad or p)
    published = analyse_burst(p.get("burst")) if p.get("burst") else {"published": True}
    if not p.get("event_seen") and not published["published"]:
        return _not_tested(published, extra)
    if not p.get("event_seen"):
        return _out("broken", "sp.stale", extra)
    if bad is not None:
        return _out("degraded", "sp.some_failed", extra, failure=bad)
    if rtt is not None and rtt > SLOW_MS:
        return _out("degraded", "sp.slow", extra, rtt=rtt)
    return _out("ok", "sp.ok", extra, rtt=rtt)


# -- long poll ----------------------------------------------------------------------------------
def long_poll(p: dict[str, Any], ev: Evidence) -> Outcome:
    ctx = ev.ctx
    hold = num(p.get("hold_s")) or 0.0
    idle, event = obj(p.get("idle")), obj(p.get("event"))
    latency = num(event.get("latency_ms"))
    if latency is not None:  # measured from sending the publish request: less its way there
        late = ctx["one_way_ms"] + queued_ms(p.get("burst"), ctx["one_way_ms"])
        latency = round(max(0.0, latency - late), 1)
    elapsed = num(idle.get("elapsed_s"))
    idle_ok = idle.get("status") == 200 and bool(idle.get("json"))
    cut_s = None
    if not idle_ok and elapsed is not None:
        cut_s = round(elapsed, 1)
    elif idle_ok:
        cut_s = cut(elapsed, hold)
    extra: dict[str, Any] = {"latency_ms": latency, "held_s": hold, "cut_after_s": cut_s, "idle_limit_s": cut_s}
    if idle.get("status") is not None:
        extra["idle_status"] = idle.get("status")
    arrived = bool(event.get("arrived"))
    if not arrived and not idle_ok:
        return _out("broken", "lp.held_failed", extra, failure=event or idle)
    if not arrived:
        return _out("broken", "lp.event_lost", extra, failure=event)
    repeat = obj(p.get("repeat"))
    if repeat.get("status") == 200 and repeat.get("json") and repeat.get("published") and not repeat.get("arrived"):
        return _out("broken", "lp.cached", extra)
    # Our own deadline (hold + slack) ended it: no answer at all, which is not a cut.
    unanswered = "deadline" in str(idle.get("error") or "") or (cut_s or 0) >= hold + 10
    if cut_s is not None and idle.get("status") is None and unanswered:
        extra["cut_after_s"] = extra["idle_limit_s"] = None
        return _out("degraded", "lp.unanswered", extra, hold=hold, cut=cut_s)
    if cut_s is not None:
        status = idle.get("status")
        status_text = f" with HTTP {status}" if isinstance(status, int) and status != 200 else ""
        cap = ctx.get("longpoll_max_timeout_s") or hold
        extra["config"] = config_lines("long_poll", cut_s)
        return _out(
            "degraded",
            "lp.cut",
            extra,
            cut=cut_s,
            hold=hold,
            status_text=status_text,
            read_timeout=int(cap) + 10,
            below=max(1, int(cut_s) - 1),
            config=extra["config"],
        )
    if latency is not None and latency > SLOW_MS:
        return _out("degraded", "lp.slow", extra, latency=latency)
    return _out("ok", "lp.ok", extra, hold=hold, latency=latency or 0)


# -- SSE ----------------------------------------------------------------------------------------
def _padding(raw: Any) -> dict[str, Any] | None:
    p = obj(raw)
    if not p:
        return None
    burst = analyse_burst(p.get("burst"))
    works = (
        p.get("status") == 200
        and burst["received"] == burst["expected"] > 0
        and not burst["bunched"]
        and (num(burst.get("first_latency_ms")) or 0) <= SLOW_MS
    )
    return {"works": bool(works), "bytes": int(num(p.get("bytes")) or 0)}


def _buffered(status: str, code: str, padding: dict[str, Any] | None, extra: dict[str, Any]) -> Outcome:
    out = _out(status, code, extra)
    if padding and padding["works"]:
        out.add("sse.padding_helps", "degraded", padding_bytes=padding["bytes"])
    elif padding:
        out.add("sse.padding_useless")
    return out


def sse(p: dict[str, Any], ev: Evidence) -> Outcome:
    ctx = ev.ctx
    hold = num(p.get("hold_s")) or 0.0
    burst = analyse_burst(p.get("burst"), ctx["one_way_ms"])
    headers_ms, first_byte_ms = num(p.get("headers_ms")), num(p.get("first_byte_ms"))
    late_first_byte = headers_ms is not None and first_byte_ms is not None and first_byte_ms - headers_ms > SLOW_MS
    padding = _padding(p.get("padding"))
    cut_s = cut(p.get("ended_after_s"), hold)
    idle = _idle(p, "idle_before_end_s", cut_s)
    extra: dict[str, Any] = {
        "buffered": False,
        "latency_ms": burst.get("first_latency_ms"),
        "held_s": hold,
        "cut_after_s": cut_s,
        "events": f"{burst['received']}/{burst['expected']}",
        "first_byte_ms": first_byte_ms,
        "heartbeats": p.get("heartbeats") if num(p.get("heartbeats")) is not None else None,
        "idle_limit_s": idle,
    }
    if padding is not None:
        extra["works_with_padding"] = padding["works"]
        extra["padding_bytes"] = padding["bytes"]
    status_code, ctype = p.get("status"), str(p.get("content_type") or "")
    answered = any(r.get("transport") == "sse" and r.get("status") == 200 for r in records(p.get("seen")))
    if status_code is None and answered and p.get("ended_after_s") is None:
        extra["buffered"] = True
        return _buffered("broken", "sse.headers_held", padding, extra)
    if status_code != 200 or (ctype and "text/event-stream" not in ctype):
        if status_code == 200:
            return _out("broken", "sse.not_a_stream", extra, ctype=ctype.split(";")[0][:80], failure=p)
        return _out("broken", "sse.open_failed", extra, failure=p)
    if not burst.get("published", True) and cut_s is None:
        return _not_tested(burst, extra)
    buffered = burst["bunched"] or late_first_byte or (burst["received"] == 0 and cut_s is None)
    extra["buffered"] = bool(buffered)
    if burst["received"] == 0:
        if cut_s is not None and cut_s < 2.0 and first_byte_ms is None:
            # Not an idle timeout (none is that short): the stream is ended as soon as it opens.
            return _out("broken", "sse.ended_at_open", extra, cut=cut_s)
        if cut_s is not None:
            return _out(
                "broken", "sse.closed_before_event", extra, cut=cut_s, idle=idle, **_keepalive("sse", cut_s, ctx)
            )
        return _buffered("broken", "sse.nothing_through", padding, extra)
    if buffered:
        return _buffered("degraded", "sse.bunched" if burst["bunched"] else "sse.held_back", padding, extra)
    latency = num(burst.get("first_latency_ms"))
    if cut_s is not None:
        extra["config"] = config_lines("sse", idle or cut_s)
        return _out(
            "degraded", "sse.cut", extra, cut=cut_s, idle=idle, hold=hold, **_keepalive("sse", idle or cut_s, ctx)
        )
    if burst["received"] < burst["expected"]:
        return _out("degraded", "sse.lost", extra, received=burst["received"], expected=burst["expected"])
    alive = obj(p.get("alive"))
    if alive and not alive.get("arrived"):
        return _out("degraded", "sse.silent", extra, hold=hold, **_keepalive("sse", hold, ctx))
    if latency is not None and latency > SLOW_MS:
        return _out("degraded", "sse.slow", extra, latency=latency)
    # Neither of these stops live events, so they are notes on an "ok", not a downgrade.
    out = _out("ok", "sse.ok", extra, latency=latency or 0, hold=hold)
    beat = ctx.get("sse_heartbeat_s")
    resume = obj(p.get("resume"))
    notes = []
    if beat is not None and hold > beat + 2 and p.get("heartbeats") == 0:
        notes.append("sse.no_heartbeats")
    if resume and not resume.get("ok"):
        notes.append("sse.resume_failed")
        out.params["detail"] = str(resume.get("error") or "the missed events did not come back")[:200]
    for code in notes:
        out.add(code)
    if notes:
        extra["notes"] = notes
    else:
        out.add("sse.resume_ok" if resume.get("ok") else "sse.resume_untested")
    return out


# -- WebSocket ----------------------------------------------------------------------------------
def _no_handshake(p: dict[str, Any], extra: dict[str, Any]) -> Outcome:
    ws = [r for r in records(p.get("seen")) if r.get("transport") == "websocket"]
    if not ws:
        http = p.get("http_status")
        note = f" (a plain request to the same URL got HTTP {http})" if isinstance(http, int) else ""
        return _out("broken", "ws.never_reached", extra, http=note)
    last = ws[-1]
    if last.get("error") == "origin_not_allowed":
        return _out(
            "broken", "ws.origin_refused", extra, origin=str(last.get("origin"))[:80], host=str(last.get("host"))[:80]
        )
    status = last.get("status")
    if isinstance(status, int) and status >= 400 and status != 426:
        code = f", {last['error']}" if last.get("error") else ""
        return _out("broken", "ws.handshake_refused", extra, status=status, error_code=str(code)[:80])
    if last.get("http_version") == "HTTP/1.0":
        return _out("broken", "ws.http10", extra)
    if "websocket" not in str(last.get("upgrade", "")).lower() or "upgrade" not in str(last.get("connection")).lower():
        return _out("broken", "ws.upgrade_stripped", extra)
    error = str(p.get("error") or "")[:200]
    return _out("broken", "ws.101_broken", extra, error=f" ({error})" if error else "")


def websocket(p: dict[str, Any], ev: Evidence) -> Outcome:
    ctx = ev.ctx
    hold = num(p.get("hold_s")) or 0.0
    echo, alive = obj(p.get("echo")), obj(p.get("alive"))
    burst = analyse_burst(p.get("burst"), ctx["one_way_ms"])
    rtt = num(echo.get("rtt_ms"))
    cut_s = cut(p.get("closed_after_s"), hold) if p.get("opened") else None
    idle = _idle(p, "idle_before_close_s", cut_s)
    extra: dict[str, Any] = {
        "latency_ms": rtt,
        "held_s": hold,
        "cut_after_s": cut_s,
        "idle_limit_s": idle,
        "events": f"{burst['received']}/{burst['expected']}",
    }
    if num(p.get("close_code")) is not None:
        extra["close_code"] = p.get("close_code")
    if not p.get("opened"):
        return _no_handshake(p, extra)
    if not burst.get("published", True):
        burst["expected"] = burst["received"]  # the server's burst never went out: judge by the echo alone
    if not echo.get("arrived") and burst["received"] == 0:
        seen = p.get("seen")
        if isinstance(seen, list) and not any(r.get("transport") == "websocket" for r in records(seen)):
            # The browser got a 101 for a request the gateway never received: the path answered it.
            return _out("broken", "ws.answered_by_path", extra, cut=cut_s)
        if cut_s is not None:
            return _out("broken", "ws.closed_before_frame", extra, cut=cut_s, idle=idle)
        return _out("broken", "ws.no_frames", extra)
    if burst["bunched"]:
        return _out("degraded", "ws.bunched", extra)
    if not echo.get("arrived") and cut_s is None:
        return _out("degraded", "ws.no_echo", extra)
    if cut_s is not None:
        extra["config"] = config_lines("websocket", idle or cut_s)
        return _out(
            "degraded", "ws.cut", extra, cut=cut_s, idle=idle, hold=hold, **_keepalive("websocket", idle or cut_s, ctx)
        )
    if burst["received"] < burst["expected"]:
        return _out("degraded", "ws.lost", extra, received=burst["received"], expected=burst["expected"])
    if alive and not alive.get("arrived"):
        return _out("degraded", "ws.silent", extra, hold=hold, **_keepalive("websocket", hold, ctx))
    if rtt is not None and rtt > SLOW_MS:
        return _out("degraded", "ws.slow", extra, rtt=rtt)
    return _out("ok", "ws.ok", extra, rtt=rtt or 0, hold=hold)


RULES = {"short_poll": short_poll, "long_poll": long_poll, "sse": sse, "websocket": websocket}


# -- what a real channel gets -------------------------------------------------------------------
def real_channel(name: str, outcome: Outcome, check: RealCheck | None, ev: Evidence) -> None:
    """The gateway's own rules on a real channel, observed: a transport that works on the probe
    channel but is refused on a real one is not ok for real clients."""
    if check is None or outcome.status == "broken" or not check.refused:
        return
    outcome.extra["real_status"] = check.status
    if check.status == 403 and check.error == "origin_not_allowed":
        origin = check.origin or str(ev.client.get("origin") or "")
        if not origin and ev.client.get("host"):
            origin = ("https://" if ev.client.get("secure") else "http://") + str(ev.client["host"])[:80]
        outcome.codes = ["real.origin_refused"]
        outcome.params = {"origin": origin[:80] or "this page's origin"}
        outcome.status = "broken"
    elif check.status == 401:
        state = "the token this run sent was not accepted" if ev.token_sent else "this run sent no token"
        outcome.add("real.unauthorized", "degraded", token_state=state)
    elif check.status == 403:
        outcome.add("real.forbidden", "degraded")
    else:
        outcome.add("real.refused", "degraded", failure={"status": check.status, "error": check.error})


# -- a cap on connection lifetime ----------------------------------------------------------------
def lifetime(outcomes: dict[str, Outcome]) -> float | None:
    """A cap on how long a connection may live, busy or not, rather than an idle timeout: the
    cut transports all ended about the same time after opening, though one of them had traffic
    well before then (under an idle timeout the busy one would have lasted longer)."""
    cut_ones = [o.extra for o in outcomes.values() if num(o.extra.get("cut_after_s"))]
    if len(cut_ones) < 2:
        return None
    totals = [float(t["cut_after_s"]) for t in cut_ones]
    if max(totals) - min(totals) > LIFETIME_SPREAD_S:
        return None
    busy = [t for t in cut_ones if (num(t.get("idle_limit_s")) or 1e9) <= float(t["cut_after_s"]) - 1.0]
    return round(statistics.median(totals), 1) if busy else None


def blame_lifetime(outcomes: dict[str, Outcome], limit: float) -> None:
    for name, o in outcomes.items():
        if not num(o.extra.get("cut_after_s")):
            continue
        o.extra["idle_limit_s"] = None
        o.extra["lifetime_limit_s"] = limit
        o.extra.pop("config", None)
        o.add("lifetime", lifetime=limit)
        if name in ("sse", "websocket"):
            o.add("lifetime.stream")
        elif name == "long_poll":
            o.add("lifetime.long_poll", below=max(1, int(limit) - 1))
