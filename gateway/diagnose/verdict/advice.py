"""Advice: every sentence and fix of the verdict, in one table keyed by finding code.

rules.py decides (status, codes, numbers); this module words it. A finding's reason and fix are
format templates over the rule's parameters plus a few derived fragments (`{what}`, `{http_fix}`,
`{cut_text}`, `{keepalive}`); `{x:secs}` writes seconds as "~5 s". The codes are what tests
assert and what tools may match on; the sentences may change.
"""

from __future__ import annotations

import string
from typing import Any

__all__ = ["ADVICE", "PATH_ADVICE", "render", "say", "config_lines", "secs", "NAMES"]

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
ORIGIN_FIX = (
    "Either make the proxy forward the browser's Host (nginx: `proxy_set_header Host $host;` in the location "
    "that proxies to the gateway, or send X-Forwarded-Host), or list your site's origin ({origin}) in "
    'server.allowed_origins (config.toml: `[server]` `allowed_origins = ["{origin}"]`).'
)
TOKEN_FIX = (
    "Real clients must send a subscriber token (`Authorization: Bearer <token>`, or `?token=<token>` for "
    "EventSource and WebSocket), or list the channels in auth.public. To test with one, open "
    "/diagnose?token=<a subscriber token> (or `python -m gateway.diagnose URL --token <token>`)."
)
NAMES = {
    "websocket": "WebSocket",
    "sse": "Server-Sent Events",
    "long_poll": "long polling",
    "short_poll": "short polling",
}

# code -> (reason, fix). A reason of a secondary finding is appended to the first's with "; ".
ADVICE: dict[str, tuple[str, str | None]] = {
    # -- any transport
    "not_run": ("the probe did not run or produced no result", None),
    "unreadable": ("the probe's results could not be read ({error})", None),
    "not_tested": (
        "could not be tested: the gateway did not publish the test events ({publish_error}); "
        "run the page again in a minute",
        None,
    ),
    # -- short poll
    "sp.request_failed": ("a plain poll request failed ({what})", "{http_fix}"),
    "sp.stale": (
        "polls answered, but a freshly published event never showed up: something on the path serves "
        "stale or cached answers",
        "Make the path pass /poll/ through uncached (the gateway sends Cache-Control: no-store).",
    ),
    "sp.some_failed": ("some poll requests failed ({what})", None),
    "sp.slow": ("works but slowly: a poll takes ~{rtt:.0f} ms", None),
    "sp.ok": ("works: a poll round trip takes ~{rtt:.0f} ms", None),
    # -- long poll
    "lp.held_failed": ("held requests fail ({what})", "{http_fix}"),
    "lp.event_lost": (
        "a held request survived, but an event published during the hold did not arrive ({what})",
        "Check that nothing on the path caches or rewrites /longpoll/ answers.",
    ),
    "lp.cached": (
        "asked again with the same cursor after a publish, the answer was the old, empty one: something on "
        "the path caches /longpoll/ answers, so clients see new events late or never",
        "Make the path pass /longpoll/ through uncached (the gateway sends Cache-Control: no-store).",
    ),
    "lp.unanswered": (
        "events arrive, but a request held {hold:.0f} s never got its answer (waited {cut:.0f} s): something "
        "on the path holds held responses back",
        "Turn response buffering off for /longpoll/ (nginx: `proxy_buffering off;`) and check proxy timeouts.",
    ),
    "lp.cut": (
        "events arrive, but a request held idle is cut after {cut:secs}{status_text} (hold was {hold:.0f} s)",
        "Raise the proxy's read timeout above the hold (nginx: `proxy_read_timeout {read_timeout}s;`), "
        "or lower poll.longpoll_max_timeout_s to {below} s (under the cut) and have clients ask for that "
        "timeout. In config.toml:\n{config}",
    ),
    "lp.slow": ("works but slowly: an event took ~{latency:.0f} ms to arrive", None),
    "lp.ok": ("works: held {hold:.0f} s without being cut; an event arrived in ~{latency:.0f} ms", None),
    # -- SSE
    "sse.headers_held": (
        "the gateway answered at once, but nothing of the stream (not even its headers) reached the client: "
        "something on the path holds the whole response back (buffering)",
        NGINX_BUFFERING,
    ),
    "sse.not_a_stream": (
        "the event stream could not be opened (the answer was {ctype}, not an event stream: something on the "
        "path answered instead)",
        "{http_fix}",
    ),
    "sse.open_failed": ("the event stream could not be opened ({what})", "{http_fix}"),
    "sse.ended_at_open": (
        "the stream was ended right after it opened ({cut:secs}), before a single byte of it arrived: "
        "something on the path does not let event streams through",
        "Make the proxy, filter or load balancer pass text/event-stream responses through as a stream "
        "(unbuffered, not ended early). " + NGINX_BUFFERING,
    ),
    "sse.closed_before_event": ("the stream was closed after {cut_text}, before any event arrived", "{keepalive}"),
    "sse.nothing_through": (
        "the stream opened but no event came through: something on the path holds it back (buffering)",
        NGINX_BUFFERING,
    ),
    "sse.bunched": ("events arrived bunched together instead of spaced out as sent: a proxy buffers the stream", None),
    "sse.held_back": ("events were held back: a proxy buffers the stream", NGINX_BUFFERING),
    "sse.padding_helps": (
        "with {padding_bytes} bytes of initial padding the events come through promptly (works with padding)",
        "Set `padding_bytes = {padding_bytes}` under [sse] in the gateway config, or turn the buffering off. "
        + NGINX_BUFFERING,
    ),
    "sse.padding_useless": ("initial padding does not help", NGINX_BUFFERING),
    "sse.cut": (
        "events arrive, but the stream is cut after {cut_text} (hold was {hold:.0f} s); browsers reconnect, at a cost",
        "{keepalive}",
    ),
    "sse.lost": ("only {received} of {expected} test events arrived: something on the path drops them", None),
    "sse.silent": ("the stream stayed open but went silent after {hold:.0f} s idle", "{keepalive}"),
    "sse.slow": ("works but slowly: events take ~{latency:.0f} ms", None),
    "sse.ok": ("works: events arrive as sent (~{latency:.0f} ms) and the stream survived {hold:.0f} s", None),
    "sse.resume_ok": ("resume works", None),
    "sse.resume_untested": ("resume was not tested", None),
    "sse.no_heartbeats": (
        "but heartbeat comments never arrived (something strips or holds back SSE comments)",
        None,
    ),
    "sse.resume_failed": (
        "reconnecting with Last-Event-ID did not resume ({detail}); clients should resume with ?since=",
        "Make the proxy forward the Last-Event-ID request header.",
    ),
    # -- WebSocket
    "ws.never_reached": (
        "the WebSocket handshake failed and the request never reached the gateway{http}: a proxy or "
        "firewall on the path refuses WebSocket",
        NGINX_WEBSOCKET,
    ),
    "ws.origin_refused": (
        "the gateway refused the WebSocket: the page's origin ({origin}) does not match the host the gateway "
        "was asked for ({host}), so a proxy rewrites the Host header",
        ORIGIN_FIX,
    ),
    "ws.handshake_refused": (
        "the WebSocket request reached the gateway with its Upgrade header but was refused "
        "(HTTP {status}{error_code}): a proxy altered the handshake request",
        "Make the proxy pass WebSocket handshakes through unchanged (Sec-WebSocket-* headers included). "
        + NGINX_WEBSOCKET,
    ),
    "ws.http10": (
        "the WebSocket request reached the gateway over HTTP/1.0 without its Upgrade header: the proxy in front "
        "of the gateway does not forward WebSocket upgrades",
        NGINX_WEBSOCKET,
    ),
    "ws.upgrade_stripped": (
        "the WebSocket request reached the gateway without its Upgrade/Connection headers: the proxy strips them",
        NGINX_WEBSOCKET,
    ),
    "ws.101_broken": (
        "the gateway accepted the WebSocket upgrade, but the handshake never completed in the browser{error}: "
        "something on the path broke the 101 response",
        NGINX_WEBSOCKET,
    ),
    "ws.answered_by_path": (
        "the WebSocket 'opened', but the gateway never received this handshake: something on the path "
        "answered it itself{closed}, and no frame gets through",
        "Use a proxy that passes WebSocket through to the gateway end to end. " + NGINX_WEBSOCKET,
    ),
    "ws.closed_before_frame": (
        "the WebSocket opened but was closed after {cut_text} before any frame arrived",
        NGINX_WEBSOCKET,
    ),
    "ws.no_frames": (
        "the WebSocket opened, but nothing arrives over it: a proxy accepted the upgrade and relays no frames",
        "Use a proxy that supports WebSocket end to end. " + NGINX_WEBSOCKET,
    ),
    "ws.bunched": ("frames arrive bunched together: something on the path buffers them", None),
    "ws.no_echo": (
        "frames from the server arrive, but frames sent from here never came back",
        "Check that the proxy relays WebSocket frames in both directions.",
    ),
    "ws.cut": (
        "works, but the connection is closed after {cut_text} (hold was {hold:.0f} s); clients must reconnect",
        "{keepalive}",
    ),
    "ws.lost": ("only {received} of {expected} test frames from the server arrived", None),
    "ws.silent": ("the connection stayed open but went silent after {hold:.0f} s idle", "{keepalive}"),
    "ws.slow": ("works but slowly: a round trip takes ~{rtt:.0f} ms", None),
    "ws.ok": (
        "works: frames flow both ways (round trip ~{rtt:.0f} ms) and the connection survived {hold:.0f} s",
        None,
    ),
    # -- what a real channel of the site gets (the probe channels are exempt from these rules)
    "real.origin_refused": (
        "the test channel got through, but the gateway refuses this page's WebSocket on a real channel "
        "(HTTP 403 origin_not_allowed): the proxy rewrites the Host header, so the gateway cannot tell your "
        "own pages ({origin}) from foreign ones; your clients' WebSockets will fail the same way",
        ORIGIN_FIX,
    ),
    "real.unauthorized": (
        "the test channel got through, but a real channel answered HTTP 401: this gateway requires "
        "authorization, and {token_state}",
        TOKEN_FIX,
    ),
    "real.forbidden": (
        "the test channel got through, but a real channel answered HTTP 403 (forbidden): the token sent does "
        "not allow reading it",
        "Issue tokens whose `channels` claim covers the channels your clients read.",
    ),
    "real.refused": (
        "the test channel got through, but a real channel was refused ({what}): real clients will be too",
        "{http_fix}",
    ),
    # -- a cap on connection lifetime, found across transports
    "lifetime": ("the path closes every connection ~{lifetime:g} s after it opens, busy or not", None),
    "lifetime.stream": (
        "",
        "Raise the proxy's or load balancer's maximum connection lifetime (here ~{lifetime:g} s); heartbeats "
        "and pings do not help against it. Until then clients must reconnect that often (EventSource does so "
        "by itself).",
    ),
    "lifetime.long_poll": (
        "",
        "Raise the proxy's or load balancer's maximum connection lifetime (here ~{lifetime:g} s), or lower "
        "poll.longpoll_max_timeout_s to {below} s (under it) and have clients ask for that timeout.",
    ),
    # -- no verdict at all (only the page writes this one, when POST /diagnose/verdict is refused)
    "no_verdict": ("no verdict", None),
}

# Path warnings, by code.
PATH_ADVICE: dict[str, str] = {
    "path.six_connections": (
        "this page runs over {protocol}: a browser opens at most six connections per origin, and each open SSE "
        "stream or held long poll uses one, so several tabs can starve each other; HTTP/2 (TLS at the proxy) "
        "lifts that limit"
    ),
    "path.http2": (
        "this page runs over HTTP/2: polls, long polls and SSE streams share one connection (no six-connection "
        "limit); WebSocket opens its own HTTP/1.1 connection{wss}"
    ),
    "path.host_rewritten": (
        "a proxy rewrites the Host header and does not say the original (X-Forwarded-Host): the gateway then "
        "refuses your pages' WebSocket handshakes on real channels (the test channels are exempt); nginx: "
        "`proxy_set_header Host $host;`, or list your site in server.allowed_origins"
    ),
    "path.platform": "{note}",
    "path.platform_setting": (
        "{name} is {value:g} s, not under the {limit:g} s {what} limit: set it below {limit:g}; "
        "in config.toml:\n{config}"
    ),
    "path.lifetime": (
        "connections through this path are closed ~{lifetime:g} s after they open, busy or not: heartbeats "
        "and pings do not help; every stream and WebSocket has to reconnect that often"
    ),
    "path.short_hold": (
        "this run held connections {hold:g} s: an idle limit longer than that (Cloudflare's 100 s, AWS's 60 s) "
        "would not show; the thorough run (/diagnose?mode=thorough) holds {thorough:g} s"
    ),
}

# The config.toml lines that keep each transport alive through an idle limit of `limit` s.
_CONFIG = {
    "sse": "[sse]\nheartbeat_s = {v}",
    "websocket": "[websocket]\nping_s = {v}",
    "long_poll": "[poll]\nlongpoll_max_timeout_s = {v}\nlongpoll_default_timeout_s = {v}",
}


def secs(value: float) -> str:
    return f"~{value:.0f} s" if value >= 2 else f"~{value:.1f} s"


def config_lines(kind: str, limit: float) -> str:
    """The exact config.toml lines for a transport cut after `limit` s idle."""
    value = max(1, int(limit * 0.5)) if kind != "long_poll" else max(1, int(limit) - 1)
    return _CONFIG[kind].format(v=value)


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec == "secs":
            return secs(float(value))
        if value is None and format_spec:
            value = 0
        return super().format_field(value, format_spec)


_FMT = _Formatter()


def http_failure(x: dict[str, Any]) -> str:
    status, error = x.get("status"), x.get("error")
    if isinstance(status, int) and status != 200:
        return f"HTTP {status}"
    if error:
        return str(error)[:200]
    if status == 200 and not x.get("json", True):
        return "the answer was not the gateway's JSON; something on the path answered instead"
    return "no answer"


def http_failure_fix(x: dict[str, Any]) -> str:
    status = x.get("status")
    if status in (502, 503, 504):
        return "The proxy could not reach the gateway or gave up waiting: check its upstream address and timeouts."
    if status in (401, 403, 407):
        return "Something on the path demands a login or refuses these URLs: allow the gateway's paths through."
    return "Check that the proxy forwards /poll/, /longpoll/, /sse/ and /ws/ to the gateway unchanged."


def _keepalive(params: dict[str, Any]) -> str:
    advice = "Raise the proxy's idle/read timeout (nginx: `proxy_read_timeout 3600s;`)"
    limit, key, value = params.get("limit"), params.get("keepalive_key"), params.get("keepalive_value")
    if key and limit is not None and value is not None and value >= limit:
        example = max(1, int(limit * 0.5))
        return advice + (
            f", or make the gateway keep the connection busy: set {key} below the cut (e.g. {example}). "
            f"In config.toml:\n{params.get('config')}"
        )
    return advice + "."


def _fragments(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    failure = params.get("failure")
    if isinstance(failure, dict):
        out["what"] = http_failure(failure)
        out["http_fix"] = http_failure_fix(failure)
    cut, idle = params.get("cut"), params.get("idle")
    if cut is not None:
        out["cut_text"] = (
            f"{secs(cut)} ({secs(idle)} after the last traffic on it)" if idle and idle < cut - 0.5 else secs(cut)
        )
    out["closed"] = f" and closed it after {secs(cut)}" if cut is not None else ""
    if "keepalive_key" in params:
        out["keepalive"] = _keepalive(params)
    return out


def say(code: str, params: dict[str, Any]) -> tuple[str, str | None]:
    """The reason and fix of one finding."""
    reason, fix = ADVICE[code]
    values = _fragments(params)
    return _FMT.format(reason, **values), (_FMT.format(fix, **values) if fix else None)


def render(codes: list[str], params: dict[str, Any]) -> tuple[str, str | None]:
    """One transport's reason (its findings' reasons joined) and fix (the last finding that has one)."""
    reasons, fix = [], None
    for code in codes:
        reason, this_fix = say(code, params)
        if reason:
            reasons.append(reason)
        fix = this_fix or fix
    return "; ".join(reasons), fix


def path_warning(code: str, params: dict[str, Any]) -> str:
    return _FMT.format(PATH_ADVICE[code], **params)
