"""Long poll without Flask: the one request a long-poll client repeats after every answer.

With a thousand long pollers, every event means a thousand requests, and Flask's routing,
request and response objects and hooks cost more than the work itself. This WSGI middleware
answers GET /longpoll/<channels> requests without an Origin header straight from the hub, through
the same admission path (gateway/admission.py) and with the same bodies, errors and headers as
the Flask route. Requests it does not take (an Origin to check, channels whose policy keeps them
in Flask, such as the probe channels) go on to Flask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import json

from gateway.admission import query_args
from gateway.errors import BadRequest
from gateway.state import State
from gateway.transports import pollbody

__all__ = ["FastLongPoll"]

log = logging.getLogger(__name__)

PREFIX = "/longpoll/"
_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FastLongPoll:
    def __init__(self, app: Callable[..., Any], st: State, timeout: Callable[[str | None, Any], float]) -> None:
        self.app = app
        self.state = st
        self.hub = st.hub
        self.poll = st.config.poll
        self.timeout = timeout

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX) or environ.get("REQUEST_METHOD") != "GET" or "HTTP_ORIGIN" in environ:
            return self.app(environ, start_response)
        admission = self.state.admission
        assert admission is not None
        text = path[len(PREFIX) :]
        if not admission.fast_path_ok(text.split(",")):
            return self.app(environ, start_response)  # e.g. probe channels: their hooks live in Flask
        try:
            args = query_args(environ.get("QUERY_STRING", ""))
            ticket = admission.admit(environ, "longpoll", text, args=args)
            left = ticket.seconds_left()
            timeout = self.timeout(args.get("timeout"), self.poll)
            if left is not None:
                timeout = max(0.0, min(timeout, left))
            with ticket:
                body = pollbody.wait(self.hub, ticket, timeout, self.poll.max_batch).encode()
        except BadRequest as exc:
            return _error(start_response, exc)
        except Exception:
            log.exception("unhandled error")
            detail = "the gateway failed to handle this request; see its log"
            return _error(start_response, BadRequest("internal_error", detail, 500))
        start_response("200 OK", [*_HEADERS, ("Content-Length", str(len(body)))])
        return [body]


def _error(start_response: Callable[..., Any], exc: BadRequest) -> list[bytes]:
    body = json.dumps({"error": exc.code, "detail": exc.detail}).encode()
    reason = _REASONS.get(exc.status, "Error")
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    headers += list((exc.headers or {}).items())
    start_response(f"{exc.status} {reason}", headers)
    return [body]
