"""Raw probe results -> the verdict, in three steps: evidence.py parses the untrusted input once,
rules.py decides (findings as codes), advice.py words them (sentences and fixes in one table).
Pure functions on plain data, shared by the page (via POST /diagnose/verdict) and the CLI, and
unit-tested on recorded results. Nothing here imports Flask.

The verdict is the contract's diagnosis JSON: per transport `ok` (events really arrived,
promptly and unbatched, the connection survived the hold, and a real channel of the site is
not refused) plus `status` ("ok" | "degraded" | "broken"), `findings` (codes), a plain-language
`reason`, a `fix` and, where a setting keeps it alive, `config` (the config.toml lines); and
`recommended`.
"""

from __future__ import annotations

from typing import Any

from gateway.diagnose.platforms import PLATFORMS
from gateway.diagnose.verdict import advice, rules
from gateway.diagnose.verdict.evidence import SLOW_MS, Evidence, analyse_burst, num, obj, parse

__all__ = ["verdict", "analyse_burst", "findings", "ORDER", "SLOW_MS"]

ORDER = ("websocket", "sse", "long_poll", "short_poll")


def _result(outcome: rules.Outcome) -> dict[str, Any]:
    reason, fix = advice.render(outcome.codes, outcome.params)
    return {
        "ok": outcome.status == "ok",
        "status": outcome.status,
        "findings": list(outcome.codes),
        "reason": reason,
        "fix": fix,
        **outcome.extra,
    }


def _outcomes(ev: Evidence) -> dict[str, rules.Outcome]:
    out: dict[str, rules.Outcome] = {}
    for name in ("short_poll", "long_poll", "sse", "websocket"):
        probe = ev.probes[name]
        if not probe:
            out[name] = rules.Outcome("broken", ["not_run"])
            continue
        try:
            out[name] = rules.RULES[name](probe, ev)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # malformed input: no evidence
            out[name] = rules.Outcome("broken", ["unreadable"], {"error": str(exc)[:120]})
            continue
        rules.real_channel(name, out[name], ev.real[name], ev)
    return out


def _platform_warnings(limits: dict[str, Any], gateway: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The platform's limits against this gateway's settings: what will be cut there."""
    found: list[tuple[str, dict[str, Any]]] = []
    idle, first = num(limits.get("idle_s")), num(limits.get("first_byte_s"))
    for key, name, kind in (
        ("sse_heartbeat_s", "sse.heartbeat_s", "sse"),
        ("websocket_ping_s", "websocket.ping_s", "websocket"),
    ):
        value = num(gateway.get(key))
        if idle and value and value >= idle:
            params = {"name": name, "value": value, "limit": idle, "what": "idle"}
            found.append(("path.platform_setting", params | {"config": advice.config_lines(kind, idle)}))
    cap = num(gateway.get("longpoll_max_timeout_s"))
    limit = min(x for x in (idle, first) if x) if (idle or first) else None
    if limit and cap and cap >= limit:
        params = {"name": "poll.longpoll_max_timeout_s", "value": cap, "limit": limit, "what": ""}
        found.append(("path.platform_setting", params | {"config": advice.config_lines("long_poll", limit)}))
    return found


def _path(ev: Evidence, transports: dict[str, Any]) -> dict[str, Any]:
    facts, client = ev.facts, ev.client
    headers = obj(facts.get("headers"))
    seen_by_browser = obj(client.get("response_headers"))
    evidence = []
    for name in ("Via", "Forwarded", "X-Forwarded-For", "X-Real-IP"):
        if name in headers:
            evidence.append(f"the gateway saw a {name} header ({str(headers[name])[:80]})")
    if facts.get("http_version") == "HTTP/1.0":
        evidence.append("the hop in front of the gateway speaks HTTP/1.0 (typical of nginx's default proxying)")
    server = str(seen_by_browser.get("server") or "")
    if server and "gevent" not in server.lower():
        evidence.append(f"the browser got answers from a server that calls itself {server[:60]!r}")
    if client.get("host") and facts.get("host") and str(client["host"]).lower() != str(facts["host"]).lower():
        evidence.append(f"the browser asked for {client['host']} but the gateway was asked for {facts['host']}")
    platform = facts.get("platform")
    limits = PLATFORMS.get(platform) if isinstance(platform, str) else None
    protocol = str(client.get("protocol") or "")
    found: list[tuple[str, dict[str, Any]]] = []
    if protocol in ("http/1.1", "http/1.0"):
        found.append(("path.six_connections", {"protocol": protocol.upper()}))
    elif protocol == "h2":
        wss = " (wss://, through the same TLS proxy)" if client.get("secure") else ""
        found.append(("path.http2", {"wss": wss}))
    # Observed, not inferred: a real channel's WebSocket was refused by the origin rule.
    if "real.origin_refused" in transports["websocket"]["findings"]:
        found.append(("path.host_rewritten", {}))
    if limits:
        found.append(("path.platform", {"note": limits["note"]}))
        found += _platform_warnings(limits, ev.gateway)
    cuts = [t.get("idle_limit_s") or t["cut_after_s"] for t in transports.values() if num(t.get("cut_after_s"))]
    hold, thorough = ev.hold_s, ev.ctx.get("thorough_hold_s")
    if not cuts and ev.mode != "thorough" and hold and thorough and hold < thorough:
        found.append(("path.short_hold", {"hold": hold, "thorough": thorough}))
    return {
        "proxy": bool(evidence),
        "evidence": evidence,
        "platform": platform if limits else None,
        "platform_limits": limits,
        "browser_protocol": protocol or None,
        "http2": protocol == "h2",
        # Over HTTP/2 every request and stream rides the page's one connection; WebSocket does not
        # (browsers open WebSockets over HTTP/1.1: RFC 8441 needs both ends, and proxies rarely do it).
        "on_http2_connection": ["short_poll", "long_poll", "sse"] if protocol == "h2" else [],
        "hop_http_version": facts.get("http_version"),
        "client_address": facts.get("client_address"),
        "idle_limit_s": min(cuts) if cuts else None,
        "findings": [code for code, _ in found],
        "warnings": [advice.path_warning(code, params) for code, params in found if code in advice.PATH_ADVICE],
    }


def verdict(raw: dict[str, Any]) -> dict[str, Any]:
    """The verdict for one run's raw results (see the module docstring)."""
    ev = parse(raw)
    outcomes = _outcomes(ev)
    limit = rules.lifetime(outcomes)
    if limit is not None:
        rules.blame_lifetime(outcomes, limit)
    transports = {name: _result(o) for name, o in outcomes.items()}
    transports["sse"].setdefault("buffered", False)
    ok = [name for name in ORDER if transports[name]["ok"]]
    usable = [name for name in ORDER if transports[name]["status"] != "broken"]
    path = _path(ev, transports)
    if limit is not None:
        path["lifetime_limit_s"], path["idle_limit_s"] = limit, None
        path["findings"].append("path.lifetime")
        path["warnings"].append(advice.path_warning("path.lifetime", {"lifetime": limit}))
    return {
        "transports": transports,
        "recommended": ok[0] if ok else None,
        "fallback": usable[0] if usable else None,
        "mode": ev.mode,
        "hold_s": ev.hold_s,
        "path": path,
        "summary": _summary(transports, ok, usable),
        "source": "server",
    }


def findings(result: dict[str, Any]) -> dict[str, list[str]]:
    """Each transport's finding codes, and the path's: what tests assert."""
    out = {name: list(t.get("findings", [])) for name, t in result["transports"].items()}
    out["path"] = list(result.get("path", {}).get("findings", []))
    return out


def _summary(transports: dict[str, Any], ok: list[str], usable: list[str]) -> str:
    names = advice.NAMES
    if ok:
        broken = [names[n] for n in ORDER if transports[n]["status"] != "ok"]
        tail = f"; not working well from here: {', '.join(broken)}" if broken else "; all four work from here"
        return f"Use {names[ok[0]]}{tail}."
    if usable:
        return f"Nothing works cleanly from here; {names[usable[0]]} works with problems (see below)."
    return "No transport got through from here: the gateway cannot be reached in real time over this path."
