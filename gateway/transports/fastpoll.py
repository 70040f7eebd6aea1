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

from gateway.admission import Ticket, query_args
from gateway.errors import BadRequest
from gateway.hub import WaitAbandoned
from gateway.state import State
from gateway.transports import pollbody

__all__ = ["FastLongPoll", "REASONS", "Answer", "TAKEN", "ok", "error_answer"]

log = logging.getLogger(__name__)

PREFIX = "/longpoll/"
SHORT_PREFIX = "/poll/"


def _prefix(path: str) -> str | None:
    if path.startswith(PREFIX):
        return PREFIX
    if path.startswith(SHORT_PREFIX):
        return SHORT_PREFIX
    return None


_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    413: "Payload Too Large",
    429: "Too Many Requests",
    200: "OK",
    202: "Accepted",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


Answer = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body
TAKEN: Answer = (200, [], b"")  # a held poll took the request: it answers it, and closes its ticket
# A held long poll (transports/heldpoll.py): (ticket, timeout) -> the body now, or None: taken.
Held = Callable[[Ticket, float], "bytes | None"]


def ok(body: bytes) -> Answer:
    """A poll's answer."""
    return 200, [*_HEADERS, ("Content-Length", str(len(body)))], body


class FastLongPoll:
    def __init__(self, app: Callable[..., Any], st: State, timeout: Callable[[str | None, Any], float]) -> None:
        self.app = app
        self.state = st
        self.hub = st.hub
        self.poll = st.config.poll
        self.timeout = timeout

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = self.answer(environ)
        if answer is None:
            return self.app(environ, start_response)
        status, headers, body = answer
        start_response(f"{status} {REASONS.get(status, 'Error')}", headers)
        return [body]

    def takes(self, method: str, path: str, has_origin: bool) -> bool:
        """Is this request one for the fast path (else Flask answers it)?"""
        if method != "GET" or has_origin:
            return False
        prefix = _prefix(path)
        if prefix is None:
            return False
        admission = self.state.admission
        assert admission is not None
        # e.g. the probe channels: their request hooks live in Flask
        return admission.fast_path_ok(path[len(prefix) :])

    def answer(self, environ: dict[str, Any], held: Held | None = None) -> Answer | None:
        """The long poll's whole answer, or None when Flask should answer this request. With
        `held`, a long poll on one channel may be taken by it (then TAKEN)."""
        path = environ.get("PATH_INFO", "")
        if not self.takes(environ.get("REQUEST_METHOD", ""), path, "HTTP_ORIGIN" in environ):
            return None
        admission = self.state.admission
        assert admission is not None
        prefix = _prefix(path)
        assert prefix is not None
        try:
            args = query_args(environ.get("QUERY_STRING", ""))
            if prefix == SHORT_PREFIX:  # short poll: long poll with no wait
                with admission.admit(environ, "poll", path[len(prefix) :], args=args) as ticket:
                    body = pollbody.read(self.hub, ticket, self.poll.max_batch)
                return ok(body)
            ticket = admission.admit(environ, "longpoll", path[len(prefix) :], args=args)
            left = ticket.seconds_left()
            timeout = self.timeout(args.get("timeout"), self.poll)
            if left is not None:
                timeout = max(0.0, min(timeout, left))
            taken = False
            ticket.open()
            try:
                if held is not None and not ticket.multi:
                    body = held(ticket, timeout)
                    taken = body is None
                    if taken:
                        return TAKEN
                else:
                    body = pollbody.wait(self.hub, ticket, timeout, self.poll.max_batch)
            finally:
                if not taken:
                    ticket.close()
        except BadRequest as exc:
            return error_answer(exc)
        except WaitAbandoned:
            raise  # the client hung up while its poll was held: nothing to answer
        except Exception:
            log.exception("unhandled error")
            detail = "the gateway failed to handle this request; see its log"
            return error_answer(BadRequest("internal_error", detail, 500))
        return ok(body)


def error_answer(exc: BadRequest) -> Answer:
    """A refusal: the contract's JSON error shape, with the error's own headers (Retry-After)."""
    body = json.dumps({"error": exc.code, "detail": exc.detail}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    headers += list((exc.headers or {}).items())
    return exc.status, headers, body
