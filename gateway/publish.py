"""POST /publish/<channel>: the push way in (webhooks, back ends, curl)."""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, jsonify, request

from gateway.auth import Credentials
from gateway.bodies import read_limited
from gateway.errors import BadRequest
from gateway.transports.common import admission, channel_arg, config, hub

__all__ = ["bp"]

bp = Blueprint("publish", __name__)

_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,128}")


@bp.post("/publish/", defaults={"channel": ""})
@bp.post("/publish/<path:channel>")
def publish(channel: str) -> tuple[Response, int]:
    server = config().server
    adm = admission()
    creds = Credentials.from_environ(request.environ, None)  # never ?token= for a POST: it would be logged
    principal = adm.auth.publish(channel, creds)
    channel = channel_arg(channel)
    adm.check_publish(request.environ, channel, principal)
    key = _idempotency_key()
    data, event = _read_body(server.max_body_bytes)
    ev = hub().publish(channel, data, event, idempotency_key=key)
    return jsonify(id=ev.id, channel=channel), 202


def _idempotency_key() -> str | None:
    """The contract's Idempotency-Key: up to 128 printable ASCII characters; a repeat within
    history.max_age_s answers with the first publish's id and stores nothing."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-128 printable ASCII characters",
        )
    return key


def _read_body(limit: int) -> tuple[str, str]:
    raw = read_limited(limit, f"the body is over the {limit}-byte limit (server.max_body_bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid_body", "the body must be UTF-8 text") from None
    if request.mimetype != "application/json":
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
