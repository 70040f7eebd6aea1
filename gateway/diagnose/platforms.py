"""Known hosting platforms and the limits that shape the advice (no Flask: the verdict reads it)."""

from __future__ import annotations

from typing import Any

__all__ = ["PLATFORMS"]

# Known platforms: how to recognise them and the limits that shape the advice.
PLATFORMS: dict[str, dict[str, Any]] = {
    "heroku": {
        "name": "Heroku router",
        "first_byte_s": 30,
        "idle_s": 55,
        "websocket": True,
        "note": "Heroku's router ends a request with no first byte in 30 s and a connection idle for 55 s",
    },
    "cloudflare": {
        "name": "Cloudflare",
        "first_byte_s": 100,
        "idle_s": 100,
        "websocket": True,
        "note": "Cloudflare ends a response that stays silent for 100 s; WebSockets pass when enabled for the zone",
    },
    "aws-elb": {
        "name": "AWS load balancer",
        "first_byte_s": None,
        "idle_s": 60,
        "websocket": True,
        "note": "AWS load balancers close connections idle for 60 s by default (idle timeout setting)",
    },
    "fly": {"name": "Fly.io proxy", "first_byte_s": None, "idle_s": 60, "websocket": True, "note": ""},
    "google": {
        "name": "Google Cloud load balancer",
        "first_byte_s": None,
        "idle_s": 30,
        "websocket": True,
        "note": "Google Cloud backend services time out responses after 30 s by default",
    },
    "render": {"name": "Render proxy", "first_byte_s": None, "idle_s": None, "websocket": True, "note": ""},
}
