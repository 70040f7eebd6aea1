"""Short poll and long poll: one JSON answer per request. Short poll is long poll with no wait."""

from __future__ import annotations

import math

from flask import Blueprint, Response, request
from flask.blueprints import BlueprintSetupState

from gateway.admission import Ticket
from gateway.config import PollConfig
from gateway.errors import BadRequest
from gateway.state import state
from gateway.transports import pollbody
from gateway.transports.common import admit, config, hub
from gateway.transports.fastpoll import FastLongPoll

__all__ = ["bp"]

bp = Blueprint("poll", __name__)


@bp.record_once
def _install_fast_path(setup: BlueprintSetupState) -> None:
    """Plain long polls skip Flask's per-request machinery (see fastpoll.py)."""
    app = setup.app
    st = state(app)
    fast = st.parts[FastLongPoll] = FastLongPoll(app.wsgi_app, st, timeout_arg)
    app.wsgi_app = fast


@bp.get("/poll/", defaults={"channel": ""})
@bp.get("/poll/<path:channel>")
def short_poll(channel: str) -> Response:
    with admit("poll", channel) as ticket:
        return _answer(pollbody.read(hub(), ticket, config().poll.max_batch))


@bp.get("/longpoll/", defaults={"channel": ""})
@bp.get("/longpoll/<path:channel>")
def long_poll(channel: str) -> Response:
    ticket = admit("longpoll", channel)
    timeout = hold_time(ticket, timeout_arg(request.args.get("timeout"), config().poll))
    with ticket:
        return _answer(pollbody.wait(hub(), ticket, timeout, config().poll.max_batch))


def timeout_arg(raw: str | None, poll: PollConfig) -> float:
    if raw is None or raw == "":
        return poll.longpoll_default_timeout_s
    try:
        timeout = float(raw)
    except ValueError:
        timeout = math.nan
    if not math.isfinite(timeout) or timeout < 0:
        raise BadRequest("invalid_timeout", "timeout must be a number of seconds, 0 or more")
    return min(timeout, poll.longpoll_max_timeout_s)


def hold_time(ticket: Ticket, timeout: float) -> float:
    """A long poll is held no longer than its token lives."""
    left = ticket.seconds_left()
    return timeout if left is None else max(0.0, min(timeout, left))


def _answer(body: bytes) -> Response:
    return Response(body, mimetype="application/json", headers={"Cache-Control": "no-store"})
