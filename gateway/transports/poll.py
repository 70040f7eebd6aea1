"""Short poll and long poll: one JSON answer per request. Short poll is long poll with no wait."""

from __future__ import annotations

import math

from flask import Blueprint, Response, request
from flask.blueprints import BlueprintSetupState

from gateway.config import PollConfig
from gateway.errors import BadRequest
from gateway.state import state
from gateway.transports.common import channel_arg, config, hub, since_arg
from gateway.transports.fastpoll import FastLongPoll

__all__ = ["bp"]

bp = Blueprint("poll", __name__)


@bp.record_once
def _install_fast_path(setup: BlueprintSetupState) -> None:
    """Plain long polls skip Flask's per-request machinery (see fastpoll.py)."""
    app = setup.app
    app.wsgi_app = FastLongPoll(app.wsgi_app, state(app).hub, state(app).config, _timeout)


@bp.get("/poll/", defaults={"channel": ""})
@bp.get("/poll/<path:channel>")
def short_poll(channel: str) -> Response:
    channel = channel_arg(channel)
    since = since_arg()
    batch = hub().read(channel, since, config().poll.max_batch)
    return _answer(batch.poll_json())


@bp.get("/longpoll/", defaults={"channel": ""})
@bp.get("/longpoll/<path:channel>")
def long_poll(channel: str) -> Response:
    channel = channel_arg(channel)
    since = since_arg()
    timeout = _timeout_arg()
    gateway = hub()
    with gateway.subscription(channel):
        batch = gateway.wait(channel, since, timeout, config().poll.max_batch)
    return _answer(batch.poll_json())


def _timeout_arg() -> float:
    return _timeout(request.args.get("timeout"), config().poll)


def _timeout(raw: str | None, poll: PollConfig) -> float:
    if raw is None or raw == "":
        return poll.longpoll_default_timeout_s
    try:
        timeout = float(raw)
    except ValueError:
        timeout = math.nan
    if not math.isfinite(timeout) or timeout < 0:
        raise BadRequest("invalid_timeout", "timeout must be a number of seconds, 0 or more")
    return min(timeout, poll.longpoll_max_timeout_s)


def _answer(body: str) -> Response:
    return Response(body, mimetype="application/json", headers={"Cache-Control": "no-store"})
