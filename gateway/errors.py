"""The package's exceptions, and the one JSON shape every error response of ours has."""

from __future__ import annotations

from flask import Response, json

__all__ = ["GatewayError", "ConfigError", "BadRequest", "error_response"]


class GatewayError(Exception):
    """Base of everything the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A config or environment mistake; the message is one line naming the key and the fix."""


class BadRequest(GatewayError):
    """Bad client input: becomes a JSON error response with this status and code."""

    def __init__(self, code: str, detail: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status
        self.headers = headers  # e.g. WWW-Authenticate on 401, Retry-After on 429/503


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    """The contract's error shape: {"error": "<short code>", "detail": "<human sentence>"}."""
    body = json.dumps({"error": code, "detail": detail})
    return Response(body, status=status, mimetype="application/json", headers=headers)
