"""The same-origin rule as a browser meets it through a proxy, and from another origin."""

from __future__ import annotations

from tests.browser import browser  # noqa: F401 (fixture)
from tests.proxies import REALTIME, start_nginx  # noqa: F401 (fixture)

# Upgrade forwarded, Host left at nginx's default ($proxy_host = the gateway's own address).
HOST_REWRITTEN = REALTIME.replace("proxy_set_header Host $host;", "")

ECHO = """([url]) => new Promise((resolve) => {
  const ws = new WebSocket(url);
  const timer = setTimeout(() => resolve("timeout"), 8000);
  ws.onopen = () => ws.send("hello from the page");
  ws.onmessage = (m) => { clearTimeout(timer); resolve(JSON.parse(m.data).data); ws.close(); };
  ws.onerror = () => { clearTimeout(timer); resolve("refused"); };
})"""


def echo_from_page(browser, page_url: str, ws_url: str) -> str:  # noqa: F811
    page = browser.new_page()
    try:
        page.goto(page_url)
        return page.evaluate(ECHO, [ws_url])
    finally:
        page.close()


def test_own_page_websocket_works_behind_nginx_forwarding_host(start_gateway, start_nginx, browser, channel):  # noqa: F811
    gw = start_gateway({"websocket": {"client_publish": ["t.*"]}})
    proxy = start_nginx(gw.port, REALTIME)  # Host $host: nginx drops the port
    ws_url = proxy.url.replace("http", "ws", 1) + f"/ws/{channel}"
    assert echo_from_page(browser, f"{proxy.url}/healthz", ws_url) == "hello from the page"


def test_behind_a_host_rewriting_proxy_only_diagnostic_channels_pass(start_gateway, start_nginx, browser, channel):  # noqa: F811
    gw = start_gateway({"websocket": {"client_publish": ["t.*"]}})
    proxy = start_nginx(gw.port, HOST_REWRITTEN)
    ws_base = proxy.url.replace("http", "ws", 1)
    # /diagnose measures the path, not the origin policy: its channels are open to every origin.
    assert echo_from_page(browser, f"{proxy.url}/healthz", f"{ws_base}/ws/diag.{channel}") == "hello from the page"
    # A real channel cannot tell this page from a foreign one (documented: forward Host).
    assert echo_from_page(browser, f"{proxy.url}/healthz", f"{ws_base}/ws/{channel}") == "refused"


def test_a_page_from_another_origin_is_refused(start_gateway, browser, channel):  # noqa: F811
    gw = start_gateway({"websocket": {"client_publish": ["t.*"]}})
    # localhost and 127.0.0.1 are different origins to the browser.
    result = echo_from_page(browser, f"http://localhost:{gw.port}/healthz", f"{gw.ws_url}/ws/{channel}")
    assert result == "refused"
