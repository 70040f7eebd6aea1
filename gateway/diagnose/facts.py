"""What the server can tell about the network path from one request: who connected, which
proxies announced themselves, which HTTP version the last hop spoke, and known platforms."""

from __future__ import annotations

from typing import Any

from flask import Request

from gateway.diagnose.platforms import PLATFORMS

__all__ = ["path_facts", "request_record", "PLATFORMS"]

# Headers that proxies and platforms add; reported as seen (truncated), never trusted for anything.
_PROXY_HEADERS = (
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Real-IP",
    "Forwarded",
    "Via",
    "X-Request-Start",
    "X-Request-Id",
    "CF-Ray",
    "CF-Connecting-IP",
    "X-Amzn-Trace-Id",
    "Fly-Request-Id",
    "X-Cloud-Trace-Context",
    "Rndr-Id",
    "X-Vercel-Id",
    "X-Azure-Ref",
)


def _platform(headers: dict[str, str]) -> str | None:
    via = headers.get("Via", "").lower()
    if "vegur" in via or "heroku" in via:
        return "heroku"
    if "CF-Ray" in headers or "CF-Connecting-IP" in headers:
        return "cloudflare"
    if "X-Amzn-Trace-Id" in headers:
        return "aws-elb"
    if "Fly-Request-Id" in headers:
        return "fly"
    if "X-Cloud-Trace-Context" in headers or "google" in via:
        return "google"
    if "Rndr-Id" in headers:
        return "render"
    return None


def path_facts(req: Request, client: str) -> dict[str, Any]:
    """The path as this request shows it to the server; `client` is the gateway's client
    identity for it (gateway.clients: X-Forwarded-For believed only from a trusted proxy)."""
    seen = {name: req.headers[name][:300] for name in _PROXY_HEADERS if name in req.headers}
    protocol = req.environ.get("SERVER_PROTOCOL", "")
    platform = _platform(seen)
    proxied = bool(seen.keys() & {"X-Forwarded-For", "X-Real-IP", "Forwarded", "Via"})
    facts: dict[str, Any] = {
        "client_address": client,
        "peer_address": req.remote_addr,
        "host": req.host[:200],
        "scheme": req.scheme,
        "http_version": protocol,
        "connection": req.headers.get("Connection", "")[:100],
        "headers": seen,
        "proxy_headers_seen": proxied,
        "platform": platform,
        "platform_limits": PLATFORMS.get(platform) if platform else None,
    }
    if protocol == "HTTP/1.0":
        facts["http10_hop"] = True
    return facts


def request_record(req: Request, transport: str) -> dict[str, Any]:
    """What one probe request looked like on arrival (kept so a failed WebSocket can be explained)."""
    return {
        "transport": transport,
        "http_version": req.environ.get("SERVER_PROTOCOL", ""),
        "upgrade": req.headers.get("Upgrade", "")[:100],
        "connection": req.headers.get("Connection", "")[:100],
        "websocket_key": "Sec-WebSocket-Key" in req.headers,
        "via": req.headers.get("Via", "")[:200],
        "origin": req.headers.get("Origin", "")[:200],
        "host": (req.headers.get("X-Forwarded-Host") or req.host)[:200],
    }
