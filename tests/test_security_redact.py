"""Issue 12, High 4: upstream credentials never appear on GET /, /status or in log lines."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import requests

from gateway.redact import redact_text, redact_url
from tests.helpers import Gateway, free_port

SECRETS = ("SuperSecretPass", "apiuser", "k3y-VALUE", "t0ken-VALUE", "s1g-VALUE")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "http://apiuser:SuperSecretPass@h:81/items.json?api_key=k&page=2",
            "http://***@h:81/items.json?api_key=***&page=2",
        ),
        (
            "https://h/feed?access_token=a&X-Amz-Signature=b&Password=c&q=ok",
            "https://h/feed?access_token=***&X-Amz-Signature=***&Password=***&q=ok",
        ),
        ("ws://u@h/ws#frag", "ws://***@h/ws"),
        ("http://[::1]:9000/x?apiKey=1", "http://[::1]:9000/x?apiKey=***"),
        ("http://h:bad/x", "***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_urls_inside_messages() -> None:
    text = "Max retries exceeded with url: /items.json?api_key=k3y&page=2 (http://u:p@h/?sig=s )"
    assert redact_text(text) == "Max retries exceeded with url: /items.json?api_key=***&page=2 (http://***@h/?sig=*** )"


def test_redact_text_judges_percent_encoded_names_by_what_they_decode_to() -> None:
    # The gateway decodes parameter names when it reads ?token=, so every page and log must too.
    text = "upstream http://h/x?%74oken=abc&ok=1&api%5Fkey=zz;tok%65n=q failed"
    assert redact_text(text) == "upstream http://h/x?%74oken=***&ok=1&api%5Fkey=***;tok%65n=*** failed"
    assert redact_text("/sse/a?since=1-0&x=token&%41=1") == "/sse/a?since=1-0&x=token&%41=1"
    # A `;` inside a value is part of it (the gateway reads ?token=a;b as "a;b"): all of it hidden.
    assert redact_text("GET /sse/a?token=abc;def&x=1 HTTP/1.1") == "GET /sse/a?token=***&x=1 HTTP/1.1"


def test_index_status_and_logs_never_show_upstream_credentials(start_gateway: Callable[..., Gateway]) -> None:
    # An upstream that refuses connections: the sources log their failures (urllib3 quotes the
    # URL with its query in the error), which must be redacted too.
    dead = free_port()
    base = f"http://apiuser:SuperSecretPass@127.0.0.1:{dead}"
    sources = [
        {
            "kind": "poll",
            "url": f"{base}/items.json?api_key=k3y-VALUE&page=2",
            "channel": "p",
            "interval": 0.1,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.1,
        },
        {
            "kind": "sse",
            "url": f"{base}/events?token=t0ken-VALUE&sig=s1g-VALUE",
            "channel": "s",
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.1,
        },
    ]
    gw = start_gateway({"sources": sources})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = requests.get(gw.url + "/status", timeout=5).json()["sources"]
        if all(s["reconnects"] >= 2 for s in status):
            break
        time.sleep(0.1)
    index = requests.get(gw.url + "/", timeout=5).text
    status_text = requests.get(gw.url + "/status", timeout=5).text
    assert "items.json?api_key=***&amp;page=2" in index and "127.0.0.1" in index
    assert "api_key=***" in status_text and "page=2" in status_text
    log = gw.log()
    assert "retrying" in log  # the failures were logged
    for secret in SECRETS:
        assert secret not in index, secret
        assert secret not in status_text, secret
        assert secret not in log, secret
    assert all(s["last_error"] for s in requests.get(gw.url + "/status", timeout=5).json()["sources"])


def test_redact_text_masks_a_jwt_wherever_it_stands() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert redact_text(f"GET /poll/a/{jwt} HTTP/1.1") == "GET /poll/a/*** HTTP/1.1"
    assert redact_text(f"bad header 'Bearer {jwt}'") == "bad header 'Bearer ***'"
    assert redact_text("GET /poll/eyJ.not-a-token HTTP/1.1") == "GET /poll/eyJ.not-a-token HTTP/1.1"


def test_a_token_pasted_into_a_path_is_not_logged(start_gateway: Callable[..., Gateway]) -> None:
    gw = start_gateway({"server": {"access_log": True}})
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzZWNyZXQifQ.c2lnbmF0dXJlLXZhbHVl"
    assert requests.get(f"{gw.url}/poll/a/{jwt}", timeout=5).status_code == 400
    deadline = time.monotonic() + 5
    while "GET /poll/a/" not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "GET /poll/a/*** " in gw.log() and "c2lnbmF0dXJlLXZhbHVl" not in gw.log()


def test_access_log_never_shows_a_token_from_the_query(start_gateway: Callable[..., Gateway]) -> None:
    gw = start_gateway({"server": {"access_log": True}})
    r = requests.get(gw.url + "/poll/news", params={"token": "t0ken-VALUE", "since": "0-0"}, timeout=5)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while "GET /poll/news" not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = gw.log()
    assert "GET /poll/news?token=***&since=0-0" in log
    assert "t0ken-VALUE" not in log
