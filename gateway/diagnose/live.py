"""GET /diagnose/live?channel=<name>: one channel arriving over all four transports side by side.

Each column shows its latency (publish time to arrival), requests, frames and bytes, so the
trade-offs between the transports are visible on a real network path. The page only reads.
"""

from __future__ import annotations

import math

from flask import Blueprint, render_template, request

from gateway.errors import BadRequest
from gateway.names import check_channel
from gateway.state import state

__all__ = ["bp"]

bp = Blueprint("diagnose_live", __name__)

DEFAULT_CHANNEL = "demo"


@bp.get("/diagnose/live")
def live() -> str:
    cfg = state().config
    channel = check_channel(request.args.get("channel") or cfg.demo.channel or DEFAULT_CHANNEL)
    options = {
        "channel": channel,
        # Short poll pays a request per interval whether or not anything happened: that is the point.
        "pollIntervalMs": int(_number("interval", 1000, 100, 60_000)),
        "longPollTimeoutS": _number("timeout", cfg.poll.longpoll_default_timeout_s, 0, cfg.poll.longpoll_max_timeout_s),
    }
    return render_template("diagnose_live.html", channel=channel, options=options)


def _number(name: str, default: float, low: float, high: float) -> float:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(f"invalid_{name}", f"{name} must be a number from {low:g} to {high:g}")
    return value
