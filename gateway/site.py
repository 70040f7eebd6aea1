"""GET / (what this gateway serves and how to try it) and GET /healthz."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, render_template, request

from gateway.redact import redact_url
from gateway.transports.common import config, hub

__all__ = ["bp"]

bp = Blueprint("site", __name__)


@bp.get("/")
def index() -> str:
    gateway = hub()
    cfg = config()
    channels = gateway.channels()
    if cfg.demo.channel and cfg.demo.channel not in channels:
        channels.insert(0, cfg.demo.channel)
    base = request.host_url.rstrip("/")
    return render_template(
        "index.html",
        channels=channels,
        base=base,
        ws_base=base.replace("http", "ws", 1),
        publishing=bool(cfg.server.publish_token),
        # Each URL as /status shows it: upstream credentials never reach a public page.
        sources=[{"kind": s.kind, "url": redact_url(s.url), "channel": s.channel} for s in cfg.sources],
    )


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    gateway = hub()
    if gateway.closing:
        return jsonify(status="shutting_down"), 503
    backend = type(gateway.store).__name__
    return jsonify(
        status="ok", backend=backend, channels=len(gateway.channels()), subscribers=gateway.subscribers()
    ), 200
