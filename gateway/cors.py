"""Cross-origin rules for the gateway's own routes.

Default: same origin only. `server.allowed_origins` lists other origins ("https://app.example")
or "*". A request whose Origin is neither same-origin nor listed is refused with 403, and that
includes WebSocket handshakes, which browsers send cross-site without any CORS check
(cross-site WebSocket hijacking). Paths that are reverse-proxied are left to the upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from flask import Flask, Response, request

from gateway.errors import error_response
from gateway.state import state

__all__ = ["init_app", "is_owned", "host_matches"]

# The routes the gateway answers itself; everything else may go to the reverse proxy.
_OWN_PATHS = frozenset({"/", "/diagnose", "/healthz", "/status", "/metrics", "/channels"})
_OWN_PREFIXES = ("/poll/", "/longpoll/", "/sse/", "/ws/", "/publish/", "/diagnose/", "/static/", "/channels/")


def is_owned(path: str) -> bool:
    return path in _OWN_PATHS or path.startswith(_OWN_PREFIXES)


# Harmless from any origin: bounded test bursts and the diagnostic channels' transports, and a
# pure verdict function. /diagnose must measure what the network path lets through, not this
# policy: behind a proxy that rewrites Host (nginx's default), the origin check would refuse
# the page's own WebSocket, and the page reports that separately (facts: host_rewritten).
OPEN_PATHS = ("/diagnose/burst", "/diagnose/verdict")
_DIAG_TRANSPORTS = re.compile(r"/(?:poll|longpoll|sse|ws)/diag\.[^/]+")


def _open_to_all(path: str) -> bool:
    return path in OPEN_PATHS or _DIAG_TRANSPORTS.fullmatch(path) is not None


def _same_origin(origin: str) -> bool:
    """Is the page that sent this request served by us? Browsers say so themselves in
    Sec-Fetch-Site, which proxies pass on untouched; without it (older browsers) compare the
    Origin with every name the request reached us by, since a proxy may rewrite Host (nginx's
    default sends the upstream's address) and say the public one in X-Forwarded-Host/Forwarded."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    return host_matches(urlsplit(origin).netloc, request.host, request.headers)


def host_matches(netloc: str, host: str, headers: Mapping[str, str]) -> bool:
    """Is `netloc` (host[:port] of a page) one of the names this request reached us by?"""
    names = [host, *headers.get("X-Forwarded-Host", "").split(",")]
    names += re.findall(r'host="?([^;,"\s]+)', headers.get("Forwarded", ""), re.IGNORECASE)
    netloc = netloc.lower()
    for name in (n.strip().lower() for n in names):
        # A proxy forwarding `Host $host` (nginx's usual line) drops the port: compare host names.
        if name and (netloc == name or (":" not in name and netloc.rsplit(":", 1)[0] == name)):
            return True
    return False


def init_app(app: Flask) -> None:
    allowed = set(state(app).config.server.allowed_origins)

    def origin_ok(origin: str) -> bool:
        return "*" in allowed or origin in allowed or _same_origin(origin)

    def owned() -> bool:
        return is_owned(request.path)

    @app.before_request
    def check_origin() -> Response | None:
        origin = request.headers.get("Origin")
        if not origin or not owned() or _open_to_all(request.path):
            return None
        if not origin_ok(origin):
            return error_response(
                403,
                "origin_not_allowed",
                f"requests from {origin[:100]} are not allowed; add it to server.allowed_origins",
            )
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
        return None

    @app.after_request
    def allow_origin(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and owned() and response.status_code != 403 and origin_ok(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        return response
