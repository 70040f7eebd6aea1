"""Headless Debian Chromium driven by Playwright (never `playwright install`), launched with
the project's flags: no network beyond loopback, no background traffic."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, require_binary

__all__ = ["browser", "tls_browser", "diagnose_page", "CHROMIUM_ARGS", "ARTIFACTS", "run_diagnose", "console_errors"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_binary(CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def tls_browser(browser: Any) -> Iterator[Any]:
    """A second Chromium from the same Playwright, accepting the test proxies' self-signed
    certificates (one Playwright per process: a second sync_playwright() would refuse)."""
    args = CHROMIUM_ARGS + ["--ignore-certificate-errors"]
    chromium = browser.browser_type.launch(executable_path=CHROMIUM, args=args, headless=True)
    try:
        yield chromium
    finally:
        chromium.close()


# What Chromium logs by itself when a probe meets a hostile path (a refused handshake, a 504, a
# stream cut mid-chunk): the measurement, which a page cannot silence. Clean paths log nothing.
_NETWORK_NOISE = ("WebSocket connection to", "Failed to load resource")


def console_errors(console: list[str]) -> list[str]:
    """Console errors that are the page's own fault (script errors, its own resources...)."""
    return [c for c in console if c.startswith(("error", "pageerror")) and not any(n in c for n in _NETWORK_NOISE)]


def run_diagnose(browser: Any, url: str, hold: float, name: str, query: str = "") -> dict[str, Any]:
    """Open {url}/diagnose?hold=N, wait for the verdict, save a screenshot, and return the
    verdict after checking that window.__diagnosis and #diagnosis-json agree and that the page
    logged no console error of its own (script errors; see console_errors). The verdict carries
    the whole console as "_console", for tests of clean paths to assert it is empty."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    try:
        page.goto(f"{url}/diagnose?hold={hold}{query}", wait_until="domcontentloaded", timeout=15_000)
        page.wait_for_function("window.__diagnosis !== undefined", timeout=(hold + 60) * 1000, polling=200)
        verdict = page.evaluate("window.__diagnosis")
        shown = json.loads(page.text_content("#diagnosis-json") or "null")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(Path(ARTIFACTS) / f"diagnose-{name}.png"), full_page=True)
        raw = page.evaluate("window.__diagnoseRaw")
        # The burst timelines drawn per transport: how many arrivals each picture shows.
        drawn = page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.probe')].map(e => [e.dataset.transport,"
            " e.querySelectorAll('.picture svg circle.arrived').length]))"
        )
        (ARTIFACTS / f"diagnose-{name}.json").write_text(json.dumps({"verdict": verdict, "raw": raw}, indent=2))
    finally:
        context.close()
    assert shown == verdict, "#diagnosis-json must hold the same verdict as window.__diagnosis"
    assert not console_errors(console), console
    verdict["_console"], verdict["_drawn"] = console, drawn
    return verdict


@pytest.fixture
def diagnose_page(browser: Any) -> Any:
    """diagnose_page(url, hold, name) -> the verdict of one /diagnose run in a fresh browser context."""
    return lambda url, hold, name, query="": run_diagnose(browser, url, hold, name, query)
