"""POST /publish/<channel>: the push way in (webhooks, back ends, curl).

One implementation, publish_request(), serves both the Flask route and a WSGI fast path: a
plain publish (no Origin to check, a declared or chunked body) skips Flask's request cycle,
so a back end publishing to thousands of channels pays for a lean parse and one store append.
On a keep-alive connection the lean request loop (transports/pollloop.py) reads such a publish
itself and has FastPublish.answer() answer it (refusals counted as from the WSGI stack), so
pywsgi's request cycle and the WSGI layers are skipped too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Response, request
from flask.blueprints import BlueprintSetupState
from werkzeug.http import parse_options_header

from gateway.admission import query_args
from gateway.auth import Credentials
from gateway.bodies import read_limited, read_stream
from gateway.errors import BadRequest
from gateway.names import check_channel
from gateway.state import State, state
from gateway.transports.fastpoll import REASONS

__all__ = ["bp", "publish_request", "FastPublish"]

bp = Blueprint("publish", __name__)
log = logging.getLogger(__name__)

PREFIX = "/publish/"
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,128}")
ReadBody = Callable[[int], bytes]  # limit -> the body (413 above it, 400 when malformed)


@bp.record_once
def _install_fast_path(setup: BlueprintSetupState) -> None:
    app = setup.app
    st = state(app)
    fast = st.parts[FastPublish] = FastPublish(app.wsgi_app, st)
    app.wsgi_app = fast


@bp.post("/publish/", defaults={"channel": ""})
@bp.post("/publish/<path:channel>")
def publish(channel: str) -> Response:
    """Publishes with an Origin header (their CORS rules live in Flask) come this way."""
    body = publish_request(state(), request.environ, channel, _read_flask_body)
    return Response(body, status=202, mimetype="application/json")


def _read_flask_body(limit: int) -> bytes:
    return read_limited(limit, _too_large(limit))


def publish_request(st: State, environ: dict[str, Any], channel: str, read_body: ReadBody) -> bytes:
    """Authorize, validate and publish one request; the 202 body, or raise BadRequest."""
    adm = st.admission
    assert adm is not None
    # The Bearer header, else ?token= as on every route (the access log masks it; proxies may not).
    creds = Credentials.from_environ(environ, query_args(environ.get("QUERY_STRING", "")).get("token"))
    principal = adm.auth.publish(channel, creds)
    channel = check_channel(channel)
    adm.check_publish(environ, channel, principal)
    key = _idempotency_key(environ.get("HTTP_IDEMPOTENCY_KEY"))
    data, event = _parse_body(read_body(st.config.server.max_body_bytes), environ.get("CONTENT_TYPE", ""))
    ev = st.hub.publish(channel, data, event, idempotency_key=key)
    return (json.dumps({"id": ev.id, "channel": channel}, separators=(",", ":")) + "\n").encode()


class FastPublish:
    """WSGI middleware: POST /publish/<channel> without an Origin header, answered without Flask."""

    def __init__(self, app: Callable[..., Any], st: State) -> None:
        self.app = app
        self.state = st

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST" or not path.startswith(PREFIX) or "HTTP_ORIGIN" in environ:
            return self.app(environ, start_response)

        def read_body(limit: int) -> bytes:
            return read_stream(environ["wsgi.input"], _content_length(environ), limit, _too_large(limit))

        status, headers, body, _ = self.answer(environ, read_body)
        start_response(f"{status} {REASONS.get(status, 'Accepted' if status == 202 else 'Error')}", headers)
        return [body]

    def answer(self, environ: dict[str, Any], read_body: ReadBody) -> tuple[int, list[tuple[str, str]], bytes, str]:
        """A publish without an Origin, whole: (status, headers, body, error code or "")."""
        path = environ.get("PATH_INFO", "")
        try:
            body = publish_request(self.state, environ, path[len(PREFIX) :], read_body)
            return 202, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body, ""
        except Exception as raised:  # noqa: BLE001 (our JSON error shape for anything)
            exc = raised if isinstance(raised, BadRequest) else _internal(raised)
        body = json.dumps({"error": exc.code, "detail": exc.detail}).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers += list((exc.headers or {}).items())
        return exc.status, headers, body, exc.code

    def answer_read(self, environ: dict[str, Any], body: bytes) -> tuple[int, list[tuple[str, str]], bytes, str]:
        """answer() for a body already read whole (the lean request loop's)."""

        def read_body(limit: int) -> bytes:
            if len(body) > limit:
                raise BadRequest("too_large", _too_large(limit), 413)
            return body

        return self.answer(environ, read_body)


def _internal(exc: Exception) -> BadRequest:
    log.error("unhandled error in a publish", exc_info=exc)
    return BadRequest("internal_error", "the gateway failed to handle this request; see its log", 500)


def _content_length(environ: dict[str, Any]) -> int | None:
    raw = environ.get("CONTENT_LENGTH")
    try:
        return int(raw) if raw else None
    except ValueError:
        raise BadRequest("invalid_body", "Content-Length must be a whole number of bytes") from None


def _too_large(limit: int) -> str:
    return f"the body is over the {limit}-byte limit (server.max_body_bytes)"


def _idempotency_key(key: str | None) -> str | None:
    """The contract's Idempotency-Key: up to 128 printable ASCII characters; a repeat within
    history.max_age_s answers with the first publish's id and stores nothing."""
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest("invalid_idempotency_key", "Idempotency-Key must be 1-128 printable ASCII characters")
    return key


def content_type(header: str) -> tuple[str, str]:
    """(media type, charset) of a Content-Type header (Werkzeug's parser: quoting, case); the
    charset defaults to UTF-8."""
    mimetype, options = parse_options_header(header)
    return mimetype.lower(), (options.get("charset") or "utf-8").lower()


def _parse_body(raw: bytes, header: str) -> tuple[str, str]:
    """(data, event) from a publish body: its text in the declared charset (UTF-8 unless said)."""
    mimetype, charset = content_type(header)
    try:
        text = raw.decode(charset)
    except LookupError:  # unknown, or a codec that is not a text encoding (e.g. base64)
        raise BadRequest("invalid_body", f"charset {charset[:40]!r} is not a text encoding the gateway knows") from None
    except ValueError:  # UnicodeDecodeError, or another codec's complaint
        raise BadRequest("invalid_body", f"the body is not valid {charset[:40]} text") from None
    if mimetype != "application/json":
        return text, "message"
    try:
        body = json.loads(text)
    except ValueError:
        raise BadRequest("invalid_json", "the body is declared application/json but is not valid JSON") from None
    except RecursionError:  # a 1 MB body can nest arrays far deeper than the parser's stack
        raise BadRequest("invalid_json", "the JSON body is nested too deeply") from None
    if not isinstance(body, dict) or "data" not in body:
        raise BadRequest("invalid_json", 'a JSON body must be an object with "data" (and optionally "event")')
    event = body.get("event")
    if event is None:  # absent or null: the default name
        event = "message"
    if not isinstance(event, str):
        raise BadRequest("invalid_event", '"event" must be a string')
    data = body["data"]
    if isinstance(data, str):
        return data, event
    try:  # NaN / Infinity (or 1e999) parse in Python but are not JSON text
        return json.dumps(data, allow_nan=False), event
    except ValueError:
        raise BadRequest("invalid_json", '"data" holds NaN or Infinity, which JSON cannot carry') from None
    except RecursionError:
        raise BadRequest("invalid_json", '"data" is nested too deeply') from None
