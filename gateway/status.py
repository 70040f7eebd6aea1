"""GET /status: each upstream source's state and counters, for operators and the diagnose page."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from gateway.state import state

__all__ = ["bp"]

bp = Blueprint("status", __name__)


@bp.get("/status")
def status() -> Response:
    st = state()
    sources, proxy = st.sources, st.config.proxy.upstream
    response = jsonify(sources=[s.status() for s in sources], proxy={"enabled": bool(proxy)})
    response.headers["Cache-Control"] = "no-store"
    return response
