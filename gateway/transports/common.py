"""What every client transport shares: reading the channel and cursor from a request."""

from __future__ import annotations

from flask import request

from gateway.config import Config
from gateway.hub import Hub
from gateway.ids import parse
from gateway.names import check_channel
from gateway.state import state

__all__ = ["hub", "config", "channel_arg", "since_arg"]


def hub() -> Hub:
    return state().hub


def config() -> Config:
    return state().config


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
