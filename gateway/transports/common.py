"""What every client transport shares: admission of the request, and the pieces of a ticket."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flask import request

from gateway.admission import Admission, Ticket
from gateway.config import Config
from gateway.hub import Hub
from gateway.ids import parse
from gateway.names import check_channel
from gateway.state import state

__all__ = [
    "hub",
    "config",
    "admission",
    "admit",
    "channel_arg",
    "since_arg",
    "positions",
    "idle_until_expiry",
    "end_detached",
]


def hub() -> Hub:
    return state().hub


def config() -> Config:
    return state().config


def admission() -> Admission:
    adm = state().admission
    assert adm is not None
    return adm


def admit(transport: str, channels: str) -> Ticket:
    """The one admission path (gateway/admission.py) for this Flask request."""
    return admission().admit(request.environ, transport, channels, args=request.args)


def positions(ticket: Ticket, gateway: Hub) -> dict[str, str]:
    """Where each channel of the ticket starts: its resume id, or its last id (from now)."""
    return {c: s if s is not None else gateway.last_id(c) for c, s in ticket.starts.items()}


def idle_until_expiry(ticket: Ticket, idle_s: float) -> float:
    """The wait before the next heartbeat, cut short when the ticket's token expires sooner."""
    left = ticket.seconds_left()
    return idle_s if left is None else max(0.0, min(idle_s, left))


def alive_until_expiry(ticket: Ticket) -> bool:
    exp = ticket.expires_at
    return exp is None or time.time() < exp


def channel_arg(channel: str) -> str:
    return check_channel(channel)


def since_arg(*, header: bool = False) -> str | None:
    """The client's resume cursor: `Last-Event-ID` (SSE reconnects send it, and it is newer than
    the URL's) before `?since=`; None means start from now. Unparseable -> 400."""
    since = request.headers.get("Last-Event-ID") if header else None
    if not since:
        since = request.args.get("since") or None
    if since is not None:
        parse(since)
    return since


def end_detached(ticket: Ticket, sock: Any, last: bytes, release: Callable[[int], None]) -> None:
    """The end of a stream that had its connection to itself (the server's `gateway.detach`):
    the ticket closed first (it no longer counts), its `last` bytes if the client still reads,
    the socket closed, as the server would have, and release() told the bytes it sent."""
    sent = ticket.bytes_sent
    try:
        ticket.close()
        if last:
            sock.sendall(last)
            sent += len(last)
    except OSError:
        pass  # the client is gone
    finally:
        try:
            sock.close()
        finally:
            release(sent)
