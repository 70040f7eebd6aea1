"""GET /status: each upstream source's state and counters, for operators and the diagnose page."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

__all__ = ["bp"]

bp = Blueprint("status", __name__)


@bp.get("/status")
def status() -> Response:
    sources = current_app.extensions.get("gateway.sources", [])
    proxy = current_app.extensions["gateway.config"].proxy.upstream
    response = jsonify(sources=[s.status() for s in sources], proxy={"enabled": bool(proxy)})
    response.headers["Cache-Control"] = "no-store"
    return response
