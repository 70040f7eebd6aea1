"""Fixtures: live gateways (real `python app.py` on a free port), always stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Gateway


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """start_gateway(config_dict, env=None) -> a running Gateway; all are stopped at teardown."""
    started: list[Gateway] = []

    def start(config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Gateway:
        gw = Gateway(config or {}, tmp_path, env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway with small limits so tests reach them quickly."""
    return start_gateway({
        "history": {"size": 50},
        "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
        "websocket": {"ping_s": 5.0, "client_publish": ["chat.*"]},
        "server": {"max_body_bytes": 4096},
        "poll": {"max_batch": 100, "longpoll_max_timeout_s": 10.0},
    })
