"""/diagnose/live in a real headless Chromium: a latency chart per transport over the last
minute (inline SVG, no library), and no console error on the page (a favicon 404 was one)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import browser as _browser
from tests.helpers import Gateway

browser = _browser.browser  # a fixture (pytest finds fixtures among a module's names)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway({}, Path(tmp_path_factory.mktemp("diag-live-chart")))
    yield gateway
    gateway.stop()


def test_live_view_draws_a_latency_chart_per_transport(browser: Any, gw: Gateway) -> None:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    try:
        page.goto(f"{gw.url}/diagnose/live?channel=live.chart&interval=300&timeout=5", wait_until="load")
        page.wait_for_function(
            "window.__live && window.__live.started && ['websocket', 'sse']"
            ".every(n => window.__live.transports[n].state === 'open')",
            timeout=15_000,
        )
        for i in range(4):
            gw.publish("live.chart", json.dumps({"n": i, "ts": time.time()}))
            time.sleep(0.3)
        page.wait_for_function(
            "Object.values(window.__live.transports).every(t => t.points.length >= 4)", timeout=15_000
        )
        page.wait_for_timeout(1200)  # the once-a-second redraw
        dots = page.evaluate(
            "Object.fromEntries(['websocket', 'sse', 'long_poll', 'short_poll'].map(n => [n,"
            " document.querySelectorAll('#col-' + n + ' [data-k=chart] svg circle').length]))"
        )
        assert all(count >= 4 for count in dots.values()), dots
        assert page.locator("#col-sse [data-k=chart] svg polyline").count() == 1
        page.screenshot(path=str(_browser.ARTIFACTS / "live-chart.png"), full_page=True)
    finally:
        context.close()
    assert not [c for c in console if c.startswith(("error", "pageerror"))], console
