"""Cross-origin rules for the gateway's own routes.

Default: same origin only. `server.allowed_origins` lists other origins ("https://app.example")
or "*". A request whose Origin is neither same-origin nor listed is refused with 403, and that
includes WebSocket handshakes, which browsers send cross-site without any CORS check
(cross-site WebSocket hijacking). Paths that are reverse-proxied are left to the upstream.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, request

from gateway.errors import error_response

__all__ = ["init_app", "is_owned"]

# The routes the gateway answers itself; everything else may go to the reverse proxy.
_OWN_PATHS = frozenset({"/", "/diagnose", "/healthz", "/status"})
_OWN_PREFIXES = ("/poll/", "/longpoll/", "/sse/", "/ws/", "/publish/", "/diagnose/", "/static/")


def is_owned(path: str) -> bool:
    return path in _OWN_PATHS or path.startswith(_OWN_PREFIXES)

# Harmless from any origin (bounded test bursts on diag.* channels, a pure verdict function), and
# /diagnose must work even behind a proxy that rewrites Host, which would fail the origin check.
OPEN_PATHS = ("/diagnose/burst", "/diagnose/verdict")


def init_app(app: Flask) -> None:
    allowed = set(app.extensions["gateway.config"].server.allowed_origins)

    def origin_ok(origin: str) -> bool:
        if "*" in allowed or origin in allowed:
            return True
        host = (request.headers.get("X-Forwarded-Host") or request.host).split(",")[0].strip().lower()
        netloc = urlsplit(origin).netloc.lower()
        # A proxy forwarding `Host $host` (nginx's usual line) drops the port: then compare host names.
        return netloc == host or (":" not in host and netloc.rsplit(":", 1)[0] == host)

    def owned() -> bool:
        return is_owned(request.path)

    @app.before_request
    def check_origin() -> Response | None:
        origin = request.headers.get("Origin")
        if not origin or not owned() or request.path in OPEN_PATHS:
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
