"""Fixtures: live gateways (real `python app.py` on a free port), always stopped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Gateway

# The config of the shared `gateway` fixture: small limits, so tests reach them quickly.
TEST_CONFIG: dict[str, Any] = {
    "history": {"size": 50},
    "sse": {"heartbeat_s": 0.5, "retry_ms": 500},
    "websocket": {"ping_s": 5.0, "client_publish": ["chat.*"]},
    "server": {"max_body_bytes": 4096},
    "poll": {"max_batch": 100, "longpoll_max_timeout_s": 10.0},
}


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


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway shared by a test module (tests use their own channels via `channel`)."""
    gw = Gateway(TEST_CONFIG, tmp_path_factory.mktemp("gateway"))
    yield gw
    gw.stop()


@pytest.fixture
def channel() -> str:
    """A channel name no other test uses."""
    return f"t.{uuid.uuid4().hex[:12]}"
