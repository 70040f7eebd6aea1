"""Long poll without Flask: the one request a long-poll client repeats after every answer.

With a thousand long pollers, every event means a thousand requests, and Flask's routing,
request and response objects and hooks cost more than the work itself. This WSGI middleware
answers the plain case (GET /longpoll/<channel> with valid arguments, no Origin header, not a
diagnostic channel) straight from the hub, with the same body and headers as the Flask route.
Everything else, errors included, goes on to Flask, which answers exactly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_plus

from flask import json

from gateway.config import Config, PollConfig
from gateway.diagnose import is_diag_channel
from gateway.errors import BadRequest
from gateway.hub import Hub
from gateway.ids import parse
from gateway.names import check_channel

__all__ = ["FastLongPoll"]

log = logging.getLogger(__name__)

PREFIX = "/longpoll/"
_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


class FastLongPoll:
    def __init__(
        self, app: Callable[..., Any], hub: Hub, config: Config, timeout: Callable[[str | None, PollConfig], float]
    ) -> None:
        self.app = app
        self.hub = hub
        self.poll = config.poll
        self.timeout = timeout

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX) or environ.get("REQUEST_METHOD") != "GET" or "HTTP_ORIGIN" in environ:
            return self.app(environ, start_response)
        channel = path[len(PREFIX) :]
        try:
            check_channel(channel)
            if is_diag_channel(channel):  # probe requests are recorded by hooks that live in Flask
                raise BadRequest("", "")
            since, timeout = self._args(environ.get("QUERY_STRING", ""))
        except BadRequest:  # Flask answers with the error, exactly as the route would
            return self.app(environ, start_response)
        try:
            with self.hub.subscription(channel):
                batch = self.hub.wait(channel, since, timeout, self.poll.max_batch)
        except BadRequest as exc:  # e.g. the backend is unavailable: 503
            return _error(start_response, exc.status, exc.code, exc.detail)
        except Exception:
            log.exception("unhandled error")
            detail = "the gateway failed to handle this request; see its log"
            return _error(start_response, 500, "internal_error", detail)
        body = batch.poll_json().encode()
        start_response("200 OK", [*_HEADERS, ("Content-Length", str(len(body)))])
        return [body]

    def _args(self, query: str) -> tuple[str | None, float]:
        """since and timeout as the Flask route reads them (the first of repeated keys wins)."""
        since: str | None = None
        raw_timeout: str | None = None
        seen_since = seen_timeout = False
        for part in query.split("&") if query else ():
            key, _, value = part.partition("=")
            if key == "since" and not seen_since:
                seen_since = True
                since = _unquote(value) or None
            elif key == "timeout" and not seen_timeout:
                seen_timeout = True
                raw_timeout = _unquote(value)
            elif "%" in key or "+" in key:
                raise BadRequest("", "")  # an encoded key: leave the parsing to Flask
        if since is not None:
            parse(since)
        return since, self.timeout(raw_timeout, self.poll)


def _unquote(value: str) -> str:
    return unquote_plus(value) if ("%" in value or "+" in value) else value


def _error(start_response: Callable[..., Any], status: int, code: str, detail: str) -> list[bytes]:
    body = json.dumps({"error": code, "detail": detail}).encode()
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
