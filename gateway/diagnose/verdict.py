"""Raw probe results -> the verdict. Pure functions on plain data, shared by the page (via
POST /diagnose/verdict) and the CLI, and unit-tested on recorded results.

The verdict is the contract's diagnosis JSON: per transport `ok` (events really arrived,
promptly and unbatched, and the connection survived the hold) plus `status`
("ok" | "degraded" | "broken"), a plain-language `reason` and a `fix`, and `recommended`.
Input comes from browsers on hostile networks: anything missing or malformed reads as "no
evidence", never as an exception.
"""

from __future__ import annotations

import statistics
from typing import Any

from gateway.cors import host_matches
from gateway.diagnose.facts import PLATFORMS

__all__ = ["verdict", "analyse_burst", "ORDER", "SLOW_MS"]

ORDER = ("websocket", "sse", "long_poll", "short_poll")
SLOW_MS = 1500.0  # an event later than this after it was sent is not "prompt"
BUNCHED_RATIO = 0.5  # arrivals squeezed into under half the send spread were held back and released together
CUT_SLACK_S = 1.0  # a hold that ends this much before its time was cut by the path
LIFETIME_SPREAD_S = 0.6  # cuts this close together after opening, one of them busy: a lifetime cap

NGINX_WEBSOCKET = (
    "nginx: in the location that proxies to the gateway add\n"
    "    proxy_http_version 1.1;\n"
    "    proxy_set_header Upgrade $http_upgrade;\n"
    '    proxy_set_header Connection "upgrade";\n'
    "Other proxies and load balancers: turn on WebSocket pass-through."
)
NGINX_BUFFERING = (
    "nginx: add `proxy_buffering off;` to that location, and do not list X-Accel-Buffering in "
    "proxy_ignore_headers (the gateway sends `X-Accel-Buffering: no`). Other proxies, antivirus or "
    "corporate filters: exempt text/event-stream from buffering or content scanning."
)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _secs(value: float) -> str:
    return f"~{value:.0f} s" if value >= 2 else f"~{value:.1f} s"


def _cut_text(cut: float, idle: float | None) -> str:
    if idle is not None and idle < cut - 0.5:
        return f"{_secs(cut)} ({_secs(idle)} after the last traffic on it)"
    return _secs(cut)


def _idle(p: dict[str, Any], key: str, cut: float | None) -> float | None:
    idle = _num(p.get(key))
    return round(idle, 1) if cut is not None and idle is not None else None


def _result(status: str, reason: str, fix: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"ok": status == "ok", "status": status, "reason": reason, "fix": fix, **extra}


def analyse_burst(burst: Any, one_way_ms: float = 0.0) -> dict[str, Any]:
    """A timed burst: how many arrived, how late the first, and whether arrivals kept the send
    spacing or came bunched together (held back by a buffer and released at once)."""
    burst = _dict(burst)
    expected = int(_num(burst.get("n")) or 0)
    arrivals = []
    for item in burst.get("arrivals") or []:
        item = _dict(item)
        at, sent, seq = _num(item.get("at_ms")), _num(item.get("sent_ms")), _num(item.get("seq"))
        if at is not None and seq is not None:
            arrivals.append((seq, at, sent))
    arrivals.sort()
    out: dict[str, Any] = {"received": len(arrivals), "expected": expected, "bunched": False}
    # Whether the gateway took the request to publish it (absent in older results: assume so).
    status = burst.get("post_status", 202)
    out["published"] = bool(arrivals) or status == 202
    if not out["published"]:
        out["publish_error"] = str(burst.get("post_error") or f"HTTP {status}")[:120]
    if not arrivals:
        return out
    gap_ms = _num(burst.get("gap_ms")) or 0.0
    delay_ms = _num(burst.get("delay_ms")) or 0.0
    # Latency of the first: arrival minus when it was due (request sent + delay + seq * gap), less
    # the publish request's own way there, so a slow link is not called slow twice.
    first_seq, first_at, _ = arrivals[0]
    out["first_latency_ms"] = round(max(0.0, first_at - delay_ms - first_seq * gap_ms - one_way_ms), 1)
    if len(arrivals) >= 3:
        sent = [s for _, _, s in arrivals if s is not None]
        send_spread = (max(sent) - min(sent)) if len(sent) == len(arrivals) else (arrivals[-1][0] - first_seq) * gap_ms
        arrive_spread = arrivals[-1][1] - first_at
        out["send_spread_ms"] = round(send_spread, 1)
        out["arrival_spread_ms"] = round(arrive_spread, 1)
        out["bunched"] = send_spread >= 400 and arrive_spread < BUNCHED_RATIO * send_spread
    return out


def _cut(ended_after: Any, hold: float) -> float | None:
    ended = _num(ended_after)
    if ended is not None and ended < hold - CUT_SLACK_S:
        return round(ended, 1)
    return None


def _short_poll(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    polls = [_dict(x) for x in p.get("polls") or []]
    good = [x for x in polls if x.get("status") == 200 and x.get("json")]
    rtts = [v for v in (_num(x.get("ms")) for x in good) if v is not None]
    rtt = round(statistics.median(rtts), 1) if rtts else None
    extra = {"latency_ms": rtt, "requests": len(polls)}
    bad = next((x for x in polls if not (x.get("status") == 200 and x.get("json"))), None)
    if not good:
        what = _http_failure(bad or p)
        return _result("broken", f"a plain poll request failed ({what})", _fix_http_failure(bad or p), **extra)
    published = analyse_burst(p.get("burst")) if p.get("burst") else {"published": True}
    if not p.get("event_seen") and not published["published"]:
        return _not_tested(published, extra)
    if not p.get("event_seen"):
        return _result(
            "broken",
            "polls answered, but a freshly published event never showed up: something on the path serves "
            "stale or cached answers",
            "Make the path pass /poll/ through uncached (the gateway sends Cache-Control: no-store).",
            **extra,
        )
    if bad is not None:
        return _result("degraded", f"some poll requests failed ({_http_failure(bad)})", None, **extra)
    if rtt is not None and rtt > SLOW_MS:
        return _result("degraded", f"works but slowly: a poll takes ~{rtt:.0f} ms", None, **extra)
    return _result("ok", f"works: a poll round trip takes ~{rtt:.0f} ms", None, **extra)


def _http_failure(x: dict[str, Any]) -> str:
    status, error = x.get("status"), x.get("error")
    if isinstance(status, int) and status != 200:
        return f"HTTP {status}"
    if error:
        return str(error)[:200]
    if status == 200 and not x.get("json", True):
        return "the answer was not the gateway's JSON; something on the path answered instead"
    return "no answer"


def _fix_http_failure(x: dict[str, Any]) -> str:
    status = x.get("status")
    if status in (502, 503, 504):
        return "The proxy could not reach the gateway or gave up waiting: check its upstream address and timeouts."
    if status in (401, 403, 407):
        return "Something on the path demands a login or refuses these URLs: allow the gateway's paths through."
    return "Check that the proxy forwards /poll/, /longpoll/, /sse/ and /ws/ to the gateway unchanged."


def _long_poll(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    hold = _num(p.get("hold_s")) or 0.0
    idle, event = _dict(p.get("idle")), _dict(p.get("event"))
    latency = _num(event.get("latency_ms"))
    if latency is not None:  # measured from sending the publish request: less its way there
        latency = round(max(0.0, latency - ctx["one_way_ms"]), 1)
    elapsed = _num(idle.get("elapsed_s"))
    idle_ok = idle.get("status") == 200 and bool(idle.get("json"))
    cut = None
    if not idle_ok and elapsed is not None:
        cut = round(elapsed, 1)
    elif idle_ok:
        cut = _cut(elapsed, hold)
    extra = {"latency_ms": latency, "held_s": hold, "cut_after_s": cut, "idle_limit_s": cut}
    if idle.get("status") is not None:
        extra["idle_status"] = idle.get("status")
    arrived = bool(event.get("arrived"))
    if not arrived and not idle_ok:
        what = _http_failure(event if event else idle)
        return _result("broken", f"held requests fail ({what})", _fix_http_failure(event or idle), **extra)
    if not arrived:
        return _result(
            "broken",
            f"a held request survived, but an event published during the hold did not arrive ({_http_failure(event)})",
            "Check that nothing on the path caches or rewrites /longpoll/ answers.",
            **extra,
        )
    repeat = _dict(p.get("repeat"))
    if repeat.get("status") == 200 and repeat.get("json") and repeat.get("published") and not repeat.get("arrived"):
        return _result(
            "broken",
            "asked again with the same cursor after a publish, the answer was the old, empty one: something on "
            "the path caches /longpoll/ answers, so clients see new events late or never",
            "Make the path pass /longpoll/ through uncached (the gateway sends Cache-Control: no-store).",
            **extra,
        )
    # Our own deadline (hold + 15 s) ended it: no answer at all, which is not a cut.
    unanswered = "deadline" in str(idle.get("error") or "") or (cut or 0) >= hold + 10
    if cut is not None and idle.get("status") is None and unanswered:
        extra["cut_after_s"] = extra["idle_limit_s"] = None
        return _result(
            "degraded",
            f"events arrive, but a request held {hold:.0f} s never got its answer (waited {cut:.0f} s): something "
            "on the path holds held responses back",
            "Turn response buffering off for /longpoll/ (nginx: `proxy_buffering off;`) and check proxy timeouts.",
            **extra,
        )
    if cut is not None:
        what = f" with HTTP {idle['status']}" if isinstance(idle.get("status"), int) and idle["status"] != 200 else ""
        cap = _num(ctx.get("longpoll_max_timeout_s")) or hold
        fix = (
            f"Raise the proxy's read timeout above the hold (nginx: `proxy_read_timeout {int(cap) + 10}s;`), "
            f"or lower poll.longpoll_max_timeout_s to below {max(1, int(cut) - 1)} s and have clients ask for "
            "that timeout."
        )
        return _result(
            "degraded",
            f"events arrive, but a request held idle is cut after {_secs(cut)}{what} (hold was {hold:.0f} s)",
            fix,
            **extra,
        )
    if latency is not None and latency > SLOW_MS:
        return _result("degraded", f"works but slowly: an event took ~{latency:.0f} ms to arrive", None, **extra)
    return _result(
        "ok", f"works: held {hold:.0f} s without being cut; an event arrived in ~{latency or 0:.0f} ms", None, **extra
    )


def _stream_cut_fix(cut: float, ctx: dict[str, Any], keepalive_key: str, keepalive: float | None) -> str:
    advice = "Raise the proxy's idle/read timeout (nginx: `proxy_read_timeout 3600s;`)"
    if keepalive is not None and keepalive >= cut:
        advice += (
            f", or make the gateway keep the connection busy: set {keepalive_key} below the cut "
            f"(e.g. {max(1, int(cut * 0.5))})"
        )
    return advice + "."


# The keepalive setting that keeps each stream open through an idle limit.
_KEEPALIVE = {"sse": ("sse.heartbeat_s", "sse_heartbeat_s"), "websocket": ("websocket.ping_s", "websocket_ping_s")}


def _cut_result(
    what: str,
    consequence: str,
    cut: float,
    idle: float | None,
    hold: float,
    ctx: dict[str, Any],
    kind: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """A stream that works but was cut during the hold: degraded, with the keepalive fix."""
    key, ctx_key = _KEEPALIVE[kind]
    fix = _stream_cut_fix(idle or cut, ctx, key, _num(ctx.get(ctx_key)))
    return _result("degraded", f"{what} (hold was {hold:.0f} s); {consequence}", fix, **extra)


def _lost_result(burst: dict[str, Any], noun: str, why: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Some of the timed burst never arrived: degraded."""
    return _result("degraded", f"only {burst['received']} of {burst['expected']} {noun} arrived{why}", None, **extra)


def _sse(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    hold = _num(p.get("hold_s")) or 0.0
    burst = analyse_burst(p.get("burst"), ctx["one_way_ms"])
    headers_ms, first_byte_ms = _num(p.get("headers_ms")), _num(p.get("first_byte_ms"))
    late_first_byte = headers_ms is not None and first_byte_ms is not None and first_byte_ms - headers_ms > SLOW_MS
    padding = _padding(p.get("padding"))
    cut = _cut(p.get("ended_after_s"), hold)
    idle = _idle(p, "idle_before_end_s", cut)
    extra: dict[str, Any] = {
        "buffered": False,
        "latency_ms": burst.get("first_latency_ms"),
        "held_s": hold,
        "cut_after_s": cut,
        "events": f"{burst['received']}/{burst['expected']}",
        "first_byte_ms": first_byte_ms,
        "heartbeats": p.get("heartbeats"),
        "idle_limit_s": idle,
    }
    if padding is not None:
        extra["works_with_padding"] = padding["works"]
        extra["padding_bytes"] = padding["bytes"]
    status_code, ctype = p.get("status"), str(p.get("content_type") or "")
    answered = any(_dict(r).get("transport") == "sse" and _dict(r).get("status") == 200 for r in p.get("seen") or [])
    if status_code is None and answered and p.get("ended_after_s") is None:
        extra["buffered"] = True
        return _buffered_result(
            "broken",
            "the gateway answered at once, but nothing of the stream (not even its headers) reached the client: "
            "something on the path holds the whole response back (buffering)",
            padding,
            extra,
        )
    if status_code != 200 or (ctype and "text/event-stream" not in ctype):
        if status_code == 200:
            what = f"the answer was {ctype.split(';')[0]}, not an event stream: something on the path answered instead"
        else:
            what = _http_failure(p)
        return _result("broken", f"the event stream could not be opened ({what})", _fix_http_failure(p), **extra)
    if not burst.get("published", True) and cut is None:
        return _not_tested(burst, extra)
    buffered = burst["bunched"] or late_first_byte or (burst["received"] == 0 and cut is None)
    extra["buffered"] = bool(buffered)
    if burst["received"] == 0:
        if cut is not None and cut < 2.0 and first_byte_ms is None:
            # Not an idle timeout (none is that short): the stream is ended as soon as it opens.
            return _result(
                "broken",
                f"the stream was ended right after it opened ({_secs(cut)}), before a single byte of it arrived: "
                "something on the path does not let event streams through",
                "Make the proxy, filter or load balancer pass text/event-stream responses through as a stream "
                "(unbuffered, not ended early). " + NGINX_BUFFERING,
                **extra,
            )
        if cut is not None:
            return _result(
                "broken",
                f"the stream was closed after {_cut_text(cut, idle)}, before any event arrived",
                _stream_cut_fix(cut, ctx, "sse.heartbeat_s", ctx.get("sse_heartbeat_s")),
                **extra,
            )
        return _buffered_result(
            "broken",
            "the stream opened but no event came through: something on the path holds it back (buffering)",
            padding,
            extra,
        )
    if buffered:
        how = "arrived bunched together instead of spaced out as sent" if burst["bunched"] else "were held back"
        return _buffered_result("degraded", f"events {how}: a proxy buffers the stream", padding, extra)
    latency = _num(burst.get("first_latency_ms"))
    if cut is not None:
        what = f"events arrive, but the stream is cut after {_cut_text(cut, idle)}"
        return _cut_result(what, "browsers reconnect, at a cost", cut, idle, hold, ctx, "sse", extra)
    if burst["received"] < burst["expected"]:
        return _lost_result(burst, "test events", ": something on the path drops them", extra)
    alive = _dict(p.get("alive"))
    if alive and not alive.get("arrived"):
        return _result(
            "degraded",
            f"the stream stayed open but went silent after {hold:.0f} s idle",
            _stream_cut_fix(hold, ctx, "sse.heartbeat_s", _num(ctx.get("sse_heartbeat_s"))),
            **extra,
        )
    if latency is not None and latency > SLOW_MS:
        return _result("degraded", f"works but slowly: events take ~{latency:.0f} ms", None, **extra)
    # Neither of these stops live events, so they are notes on an "ok", not a downgrade.
    notes, fix = [], None
    beat = _num(ctx.get("sse_heartbeat_s"))
    if beat is not None and hold > beat + 2 and p.get("heartbeats") == 0:
        notes.append("heartbeat comments never arrived (something strips or holds back SSE comments)")
    resume = _dict(p.get("resume"))
    if resume and not resume.get("ok"):
        detail = str(resume.get("error") or "the missed events did not come back")[:200]
        notes.append(f"reconnecting with Last-Event-ID did not resume ({detail}); clients should resume with ?since=")
        fix = "Make the proxy forward the Last-Event-ID request header."
    resumed = "resume works" if resume.get("ok") else "resume was not tested"
    reason = f"works: events arrive as sent (~{latency or 0:.0f} ms) and the stream survived {hold:.0f} s"
    reason += "; but " + "; ".join(notes) if notes else f"; {resumed}"
    if notes:
        extra["notes"] = notes
    return _result("ok", reason, fix, **extra)


def _not_tested(burst: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return _result(
        "broken",
        f"could not be tested: the gateway did not publish the test events ({burst.get('publish_error')}); "
        "run the page again in a minute",
        None,
        **extra,
    )


def _padding(raw: Any) -> dict[str, Any] | None:
    p = _dict(raw)
    if not p:
        return None
    burst = analyse_burst(p.get("burst"))
    works = (
        p.get("status") == 200
        and burst["received"] == burst["expected"] > 0
        and not burst["bunched"]
        and (_num(burst.get("first_latency_ms")) or 0) <= SLOW_MS
    )
    return {"works": bool(works), "bytes": int(_num(p.get("bytes")) or 0)}


def _buffered_result(status: str, reason: str, padding: dict[str, Any] | None, extra: dict[str, Any]) -> dict:
    if padding and padding["works"]:
        return _result(
            "degraded",
            reason + f"; with {padding['bytes']} bytes of initial padding the events come through promptly "
            "(works with padding)",
            f"Set `padding_bytes = {padding['bytes']}` under [sse] in the gateway config, or turn the buffering off. "
            + NGINX_BUFFERING,
            **extra,
        )
    tried = "; initial padding does not help" if padding else ""
    return _result(status, reason + tried, NGINX_BUFFERING, **extra)


def _websocket(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    hold = _num(p.get("hold_s")) or 0.0
    echo, alive = _dict(p.get("echo")), _dict(p.get("alive"))
    burst = analyse_burst(p.get("burst"), ctx["one_way_ms"])
    rtt = _num(echo.get("rtt_ms"))
    cut = _cut(p.get("closed_after_s"), hold) if p.get("opened") else None
    idle = _idle(p, "idle_before_close_s", cut)
    extra: dict[str, Any] = {
        "latency_ms": rtt,
        "held_s": hold,
        "cut_after_s": cut,
        "idle_limit_s": idle,
        "events": f"{burst['received']}/{burst['expected']}",
    }
    if p.get("close_code") is not None:
        extra["close_code"] = p.get("close_code")
    if not p.get("opened"):
        reason, fix = _why_no_handshake(p)
        return _result("broken", reason, fix, **extra)
    if not burst.get("published", True):
        burst["expected"] = burst["received"]  # the server's burst never went out: judge by the echo alone
    if not echo.get("arrived") and burst["received"] == 0:
        seen = p.get("seen")
        if isinstance(seen, list) and not any(_dict(r).get("transport") == "websocket" for r in seen):
            # The browser got a 101 for a request the gateway never received: the path answered it.
            closed = f" and closed it after {_secs(cut)}" if cut is not None else ""
            return _result(
                "broken",
                "the WebSocket 'opened', but the gateway never received this handshake: something on the path "
                f"answered it itself{closed}, and no frame gets through",
                "Use a proxy that passes WebSocket through to the gateway end to end. " + NGINX_WEBSOCKET,
                **extra,
            )
        if cut is not None:
            return _result(
                "broken",
                f"the WebSocket opened but was closed after {_cut_text(cut, idle)} before any frame arrived",
                NGINX_WEBSOCKET,
                **extra,
            )
        return _result(
            "broken",
            "the WebSocket opened, but nothing arrives over it: a proxy accepted the upgrade and relays no frames",
            "Use a proxy that supports WebSocket end to end. " + NGINX_WEBSOCKET,
            **extra,
        )
    if burst["bunched"]:
        return _result("degraded", "frames arrive bunched together: something on the path buffers them", None, **extra)
    if not echo.get("arrived") and cut is None:
        return _result(
            "degraded",
            "frames from the server arrive, but frames sent from here never came back",
            "Check that the proxy relays WebSocket frames in both directions.",
            **extra,
        )
    if cut is not None:
        what = f"works, but the connection is closed after {_cut_text(cut, idle)}"
        return _cut_result(what, "clients must reconnect", cut, idle, hold, ctx, "websocket", extra)
    if burst["received"] < burst["expected"]:
        return _lost_result(burst, "test frames from the server", "", extra)
    if alive and not alive.get("arrived"):
        return _result(
            "degraded",
            f"the connection stayed open but went silent after {hold:.0f} s idle",
            _stream_cut_fix(hold, ctx, "websocket.ping_s", _num(ctx.get("websocket_ping_s"))),
            **extra,
        )
    if rtt is not None and rtt > SLOW_MS:
        return _result("degraded", f"works but slowly: a round trip takes ~{rtt:.0f} ms", None, **extra)
    return _result(
        "ok",
        f"works: frames flow both ways (round trip ~{rtt or 0:.0f} ms) and the connection survived {hold:.0f} s",
        None,
        **extra,
    )


def _why_no_handshake(p: dict[str, Any]) -> tuple[str, str]:
    seen = [_dict(r) for r in p.get("seen") or []]
    ws = [r for r in seen if r.get("transport") == "websocket"]
    error = str(p.get("error") or "")[:200]
    if not ws:
        http = p.get("http_status")
        extra = f" (a plain request to the same URL got HTTP {http})" if isinstance(http, int) else ""
        return (
            f"the WebSocket handshake failed and the request never reached the gateway{extra}: a proxy or "
            "firewall on the path refuses WebSocket",
            NGINX_WEBSOCKET,
        )
    last = ws[-1]
    if last.get("error") == "origin_not_allowed":
        return (
            f"the gateway refused the WebSocket: the page's origin ({str(last.get('origin'))[:80]}) does not match "
            f"the host the gateway was asked for ({str(last.get('host'))[:80]}), so a proxy rewrites the Host header",
            "nginx: forward the browser's Host: `proxy_set_header Host $http_host;` (or set X-Forwarded-Host), "
            "or list this page's origin in server.allowed_origins.",
        )
    status = last.get("status")
    if isinstance(status, int) and status >= 400 and status != 426:
        return (
            f"the WebSocket request reached the gateway with its Upgrade header but was refused (HTTP {status}"
            f"{', ' + str(last['error']) if last.get('error') else ''}): a proxy altered the handshake request",
            "Make the proxy pass WebSocket handshakes through unchanged (Sec-WebSocket-* headers included). "
            + NGINX_WEBSOCKET,
        )
    if last.get("http_version") == "HTTP/1.0":
        return (
            "the WebSocket request reached the gateway over HTTP/1.0 without its Upgrade header: the proxy in front "
            "of the gateway does not forward WebSocket upgrades",
            NGINX_WEBSOCKET,
        )
    if "websocket" not in str(last.get("upgrade", "")).lower() or "upgrade" not in str(last.get("connection")).lower():
        return (
            "the WebSocket request reached the gateway without its Upgrade/Connection headers: the proxy strips them",
            NGINX_WEBSOCKET,
        )
    return (
        "the gateway accepted the WebSocket upgrade, but the handshake never completed in the browser"
        + (f" ({error})" if error else "")
        + ": something on the path broke the 101 response",
        NGINX_WEBSOCKET,
    )


def _platform_advice(limits: dict[str, Any], gateway: dict[str, Any]) -> list[str]:
    """The platform's limits against this gateway's settings: what will be cut there."""
    advice = []
    idle, first = _num(limits.get("idle_s")), _num(limits.get("first_byte_s"))
    for key, name in (("sse_heartbeat_s", "sse.heartbeat_s"), ("websocket_ping_s", "websocket.ping_s")):
        value = _num(gateway.get(key))
        if idle and value and value >= idle:
            advice.append(f"{name} is {value:g} s, not under the {idle:g} s idle limit: set it below {idle:g}")
    cap = _num(gateway.get("longpoll_max_timeout_s"))
    limit = min(x for x in (idle, first) if x) if (idle or first) else None
    if limit and cap and cap >= limit:
        advice.append(
            f"poll.longpoll_max_timeout_s is {cap:g} s, not under the {limit:g} s limit: set it below {limit:g}"
        )
    return advice


def _path(raw: dict[str, Any], transports: dict[str, Any]) -> dict[str, Any]:
    facts, client = _dict(raw.get("facts")), _dict(raw.get("client"))
    headers = _dict(facts.get("headers"))
    seen_by_browser = _dict(client.get("response_headers"))
    evidence = []
    for name in ("Via", "Forwarded", "X-Forwarded-For", "X-Real-IP"):
        if name in headers:
            evidence.append(f"the gateway saw a {name} header ({str(headers[name])[:80]})")
    if facts.get("http_version") == "HTTP/1.0":
        evidence.append("the hop in front of the gateway speaks HTTP/1.0 (typical of nginx's default proxying)")
    server = str(seen_by_browser.get("server") or "")
    if server and "gevent" not in server.lower():
        evidence.append(f"the browser got answers from a server that calls itself {server[:60]!r}")
    host_rewritten = False
    if client.get("host") and facts.get("host") and str(client["host"]).lower() != str(facts["host"]).lower():
        evidence.append(f"the browser asked for {client['host']} but the gateway was asked for {facts['host']}")
        host_rewritten = not host_matches(str(client["host"]), str(facts["host"]), headers)
    platform = facts.get("platform")
    limits = PLATFORMS.get(platform) if isinstance(platform, str) else None
    protocol = str(client.get("protocol") or "")
    warnings = []
    if protocol in ("http/1.1", "http/1.0"):
        warnings.append(
            f"this page runs over {protocol.upper()}: a browser opens at most six connections per origin, and each "
            "open SSE stream or held long poll uses one, so several tabs can starve each other; HTTP/2 (TLS at the "
            "proxy) lifts that limit"
        )
    if host_rewritten:
        warnings.append(
            "a proxy rewrites the Host header and does not say the original (X-Forwarded-Host): the gateway then "
            "cannot tell your own pages from foreign ones, and refuses their WebSocket handshakes and cross-checked "
            "requests on real channels (this test's channels are exempt); nginx: `proxy_set_header Host $host;`, "
            "or list your site in server.allowed_origins"
        )
    cuts = [t.get("idle_limit_s") or t["cut_after_s"] for t in transports.values() if _num(t.get("cut_after_s"))]
    if limits:
        warnings.append(limits["note"])
        warnings += _platform_advice(limits, _dict(facts.get("gateway")))
    out: dict[str, Any] = {
        "proxy": bool(evidence),
        "evidence": evidence,
        "platform": platform if limits else None,
        "platform_limits": limits,
        "browser_protocol": protocol or None,
        "hop_http_version": facts.get("http_version"),
        "client_address": facts.get("client_address"),
        "idle_limit_s": min(cuts) if cuts else None,
        "warnings": warnings,
    }
    return out


def verdict(raw: dict[str, Any]) -> dict[str, Any]:
    """The verdict for one run's raw results (see the module docstring)."""
    raw = _dict(raw)
    probes = _dict(raw.get("probes"))
    gateway = _dict(_dict(raw.get("facts")).get("gateway"))
    # Half the quickest round trip of the run: the way there of a request on this path. The
    # quickest, not each request's own, because a buffering path delays answers, not requests.
    base_rtt = _num(raw.get("min_rtt_ms"))
    ctx = {
        "one_way_ms": min(base_rtt / 2, 2000.0) if base_rtt and base_rtt > 0 else 0.0,
        "sse_heartbeat_s": gateway.get("sse_heartbeat_s"),
        "websocket_ping_s": gateway.get("websocket_ping_s"),
        "longpoll_max_timeout_s": gateway.get("longpoll_max_timeout_s"),
    }
    builders = {"short_poll": _short_poll, "long_poll": _long_poll, "sse": _sse, "websocket": _websocket}
    transports: dict[str, Any] = {}
    for name in ("short_poll", "long_poll", "sse", "websocket"):
        probe = probes.get(name)
        if not isinstance(probe, dict) or not probe:
            transports[name] = _result("broken", "the probe did not run or produced no result", None)
        else:
            try:
                transports[name] = builders[name](probe, ctx)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:  # malformed input: no evidence
                transports[name] = _result("broken", f"the probe's results could not be read ({exc})", None)
        if name == "sse":
            transports[name].setdefault("buffered", False)
    lifetime = _lifetime(transports)
    if lifetime is not None:
        _blame_lifetime(transports, lifetime)
    ok = [name for name in ORDER if transports[name]["ok"]]
    usable = [name for name in ORDER if transports[name]["status"] != "broken"]
    path = _path(raw, transports)
    if lifetime is not None:
        path["lifetime_limit_s"], path["idle_limit_s"] = lifetime, None
        path["warnings"].append(
            f"connections through this path are closed ~{lifetime:g} s after they open, busy or not: heartbeats "
            "and pings do not help; every stream and WebSocket has to reconnect that often"
        )
    result: dict[str, Any] = {
        "transports": transports,
        "recommended": ok[0] if ok else None,
        "fallback": usable[0] if usable else None,
        "mode": raw.get("mode") if isinstance(raw.get("mode"), str) else None,
        "hold_s": _num(raw.get("hold_s")),
        "path": path,
        "summary": _summary(transports, ok, usable),
        "source": "server",
    }
    return result


def _lifetime(transports: dict[str, Any]) -> float | None:
    """A cap on how long a connection may live, busy or not, rather than an idle timeout: the
    cut transports all ended about the same time after opening, though one of them had traffic
    well before then (under an idle timeout the busy one would have lasted longer)."""
    cut = [t for t in transports.values() if _num(t.get("cut_after_s"))]
    if len(cut) < 2:
        return None
    totals = [float(t["cut_after_s"]) for t in cut]
    if max(totals) - min(totals) > LIFETIME_SPREAD_S:
        return None
    busy = [t for t in cut if (_num(t.get("idle_limit_s")) or 1e9) <= float(t["cut_after_s"]) - 1.0]
    return round(statistics.median(totals), 1) if busy else None


def _blame_lifetime(transports: dict[str, Any], lifetime: float) -> None:
    for name, t in transports.items():
        if not _num(t.get("cut_after_s")):
            continue
        t["idle_limit_s"] = None
        t["lifetime_limit_s"] = lifetime
        t["reason"] += f"; the path closes every connection ~{lifetime:g} s after it opens, busy or not"
        if name in ("sse", "websocket"):
            t["fix"] = (
                f"Raise the proxy's or load balancer's maximum connection lifetime (here ~{lifetime:g} s); "
                "heartbeats and pings do not help against it. Until then clients must reconnect that often "
                "(EventSource does so by itself)."
            )
        elif name == "long_poll":
            t["fix"] = (
                f"Raise the proxy's or load balancer's maximum connection lifetime (here ~{lifetime:g} s), or "
                f"lower poll.longpoll_max_timeout_s to below {max(1, int(lifetime) - 1)} s and have clients ask "
                "for that timeout."
            )


def _summary(transports: dict[str, Any], ok: list[str], usable: list[str]) -> str:
    names = {
        "websocket": "WebSocket",
        "sse": "Server-Sent Events",
        "long_poll": "long polling",
        "short_poll": "short polling",
    }
    if ok:
        broken = [names[n] for n in ORDER if transports[n]["status"] != "ok"]
        tail = f"; not working well from here: {', '.join(broken)}" if broken else "; all four work from here"
        return f"Use {names[ok[0]]}{tail}."
    if usable:
        return f"Nothing works cleanly from here; {names[usable[0]]} works with problems (see below)."
    return "No transport got through from here: the gateway cannot be reached in real time over this path."
