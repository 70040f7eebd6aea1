"""create_app(): config -> hub -> services -> blueprints. No state lives outside the app."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect, WebsocketMismatch

from gateway import config as config_mod
from gateway import connlog, cors, diagnose, metrics, operator, proxy, publish, reporting, site, sources, status
from gateway.admission import Admission
from gateway.clients import TrustedProxies
from gateway.config import Config
from gateway.demo import Ticker
from gateway.errors import BadRequest, error_response
from gateway.hub import make_hub
from gateway.state import State, install
from gateway.transports import BLUEPRINTS, ws

__all__ = ["create_app"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the project root: templates/ and static/


def create_app(overrides: dict[str, Any] | None = None, *, config: Config | None = None) -> Flask:
    """Build the gateway. With no arguments the config comes from the file and environment;
    `overrides` (plain data, as in config.toml) builds it from defaults without either."""
    if config is None:
        config = config_mod.load() if overrides is None else config_mod.from_mapping(overrides)
    app = Flask("gateway", root_path=str(ROOT), template_folder="templates", static_folder="static")
    app.json.sort_keys = False
    hub = make_hub(config)
    st = install(app, State(config=config, hub=hub, trusted=TrustedProxies(config.server.trusted_proxies)))
    st.admission = Admission(config, hub, st.trusted)
    if config.demo.channel:
        st.services.append(Ticker(hub, config.demo.channel, config.demo.interval_s))

    ws.init_app(app)
    cors.init_app(app)
    app.register_blueprint(publish.bp)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    app.register_blueprint(site.bp)
    sources.init_app(app)
    app.register_blueprint(status.bp)
    metrics.init_app(app)
    connlog.init_app(app)
    reporting.init_app(app)
    operator.init_app(app)
    diagnose.init_app(app)
    proxy.init_app(app)
    _register_error_handlers(app)
    return app


def _register_error_handlers(app: Flask) -> None:
    @app.before_request
    def no_slash_redirect() -> Response | None:
        # Werkzeug answers `/sse` with an HTML 308 to `/sse/`, which an API client does not
        # follow (and which would have it send a POST again): a JSON 404 instead. Registered
        # last, so that with a proxy configured the app behind it still gets these paths.
        if isinstance(request.routing_exception, RequestRedirect):
            detail = f"{request.path} is no route of the gateway; name a channel: {request.path}/<channel>"
            return error_response(404, "not_found", detail)
        return None

    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest) -> Response:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.errorhandler(WebsocketMismatch)
    def websocket_required(exc: WebsocketMismatch) -> Response:
        return error_response(
            426,
            "websocket_required",
            "this route speaks WebSocket: open it with a WebSocket client",
            {"Upgrade": "websocket"},
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        headers = {"Allow": ", ".join(exc.valid_methods)} if getattr(exc, "valid_methods", None) else None
        return error_response(exc.code or 500, code, exc.description or exc.name, headers)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the gateway failed to handle this request; see its log")
