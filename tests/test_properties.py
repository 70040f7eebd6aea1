"""Property tests (Hypothesis) for what attackers control: channel names and lists, ids and
cursors, `since`, publish bodies in every Unicode plane (surrogates included), event names,
config files, the upstream SSE parser, and raw request heads through a live server.

The invariant everywhere: a clean 4xx (JSON error shape) or a correct answer; never a 500, never
a traceback in the log; an accepted event is readable on poll with the same data and name, and
its encodings for every transport decode back to it. Derandomized, with small example counts,
so the file is repeatable in CI and stays well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as config_module
from gateway.config import Config, ConfigError, from_mapping
from gateway.cursor import decode as decode_cursor
from gateway.errors import BadRequest
from gateway.eventdata import InvalidData, check_data
from gateway.hub.events import Event
from gateway.ids import parse
from gateway.names import check_channel, check_event_name
from gateway.sources.sseparse import SSEParser
from tests.helpers import TOKEN, Gateway
from tests.upstreams import Upstream

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SETTINGS = settings(
    derandomize=True,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LIVE = settings(SETTINGS, max_examples=60)

# Every plane, surrogates included (Hypothesis leaves category Cs out unless told).
any_char = st.characters(exclude_categories=())
any_text = st.text(any_char, max_size=300)
channelish = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,130}", fullmatch=True),
    st.text(any_char, min_size=0, max_size=140),
)
idish = st.one_of(
    st.from_regex(r"[0-9]{1,18}-[0-9]{1,12}", fullmatch=True),
    st.from_regex(r"m~[A-Za-z0-9_.~-]{0,60}", fullmatch=True),
    st.text(any_char, max_size=40),
)


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# -- pure functions ---------------------------------------------------------------------------


@SETTINGS
@given(channelish)
def test_channel_names_are_accepted_exactly_by_the_contract_rule(name: str) -> None:
    valid = (
        1 <= len(name) <= 128
        and name[0] in string.ascii_letters + string.digits
        and all(c in string.ascii_letters + string.digits + "._:-" for c in name)
    )
    try:
        assert check_channel(name) == name and valid
    except BadRequest as exc:
        assert not valid and exc.status == 400 and exc.code == "invalid_channel"


@SETTINGS
@given(idish, st.lists(st.from_regex(r"[a-z][a-z0-9.]{0,10}", fullmatch=True), min_size=1, max_size=4))
def test_ids_and_cursors_parse_or_are_a_400(text: str, channels: list[str]) -> None:
    for parser in (parse, lambda t: decode_cursor(t, channels)):
        try:
            parser(text)
        except BadRequest as exc:
            assert exc.status == 400 and exc.detail


@SETTINGS
@given(any_text)
def test_event_data_is_refused_exactly_when_it_is_not_utf8(text: str) -> None:
    try:
        assert check_data(text) == text and not _has_surrogate(text)
    except InvalidData:
        assert _has_surrogate(text)


@SETTINGS
@given(st.text(any_char, min_size=1, max_size=300).filter(lambda t: not _has_surrogate(t)), st.text(max_size=20))
def test_every_transport_encoding_decodes_back_to_the_event(data: str, name: str) -> None:
    try:
        name = check_event_name(name)
    except BadRequest:
        name = "message"
    ev = Event("1-0", name, data, (1, 0), "0-0", 0.0)
    assert json.loads(ev.json) == {"id": "1-0", "event": name, "data": data}
    frame = ev.ws
    payload = frame[2:] if frame[1] < 126 else frame[4:] if frame[1] == 126 else frame[10:]
    assert frame[0] == 0x81 and json.loads(payload.decode("utf-8"))["data"] == data
    (message,) = SSEParser().feed(ev.sse)
    # SSE has no way to carry a lone CR: line ends all come back as LF, as the spec says.
    assert message.data == data.replace("\r\n", "\n").replace("\r", "\n")
    assert (message.event or "message") == name and message.id == "1-0"


# -- the upstream SSE parser ---------------------------------------------------------------------

sse_stream = st.lists(
    st.one_of(
        st.sampled_from([b"data: x\n", b"\n", b"\r\n", b"\r", b"event: e\n", b"id: 7\n", b"retry: 10\n", b":c\n"]),
        st.sampled_from([b"\xef\xbb\xbf", b"data", b":", b" ", b"\xff\xfe", b"\xed\xa0\x80", b"\x00", b"id: a\x00b\n"]),
        st.binary(max_size=40),
    ),
    max_size=30,
).map(b"".join)


@SETTINGS
@given(sse_stream, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_sse_parser_is_split_invariant_and_bounded(stream: bytes, cuts: list[int]) -> None:
    whole = SSEParser(max_event_bytes=64)
    expected = [(m.data, m.event, m.id) for m in whole.feed(stream)]
    pieces, last = [], 0
    for cut in sorted(min(c, len(stream)) for c in cuts):
        pieces.append(stream[last:cut])
        last = cut
    pieces.append(stream[last:])
    split = SSEParser(max_event_bytes=64)
    got = [(m.data, m.event, m.id) for piece in pieces for m in split.feed(piece)]
    assert got == expected
    assert split.retry_ms == whole.retry_ms and split.oversized == whole.oversized
    for data, _, _ in got:
        assert len(data.encode("utf-8")) <= 64 and check_data(data) == data


# -- config files -----------------------------------------------------------------------------


def _known_keys() -> dict[str, list[str]]:
    out = {}
    for f in dataclasses.fields(Config):
        hint = f.type if isinstance(f.type, type) else None
        cls = getattr(config_module, {"sources": "SourceConfig"}.get(f.name, f"{f.name.capitalize()}Config"), hint)
        if dataclasses.is_dataclass(cls):
            out[f.name] = [g.name for g in dataclasses.fields(cls)]
    return out


KNOWN = _known_keys()
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(any_char, max_size=30),
    st.sampled_from(["http://127.0.0.1:1/x", "redis://h:1/0", "sse", "poll", "websocket", "lazy", "json", "*"]),
)
value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def config_mapping(draw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from([*KNOWN, "bogus"]), max_size=4, unique=True)):
        keys = KNOWN.get(section, ["x"])
        table = {k: draw(value) for k in draw(st.lists(st.sampled_from([*keys, "nope"]), max_size=4, unique=True))}
        if section == "sources":
            data[section] = draw(st.one_of(st.just([table]), value))
        else:
            data[section] = draw(st.one_of(st.just(table), value))
    return data


@SETTINGS
@given(config_mapping())
def test_config_from_random_data_is_a_config_or_one_config_error(data: dict[str, Any]) -> None:
    try:
        assert isinstance(from_mapping(data), Config)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message


# -- through a live gateway ---------------------------------------------------------------------


def _clean(r: requests.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400 and r.headers.get("Content-Type", "").startswith("application/json"):
        body = r.json()
        assert body["error"] and body["detail"]


@LIVE
@given(channelish, idish)
def test_poll_with_any_channel_and_since_is_clean(gateway: Gateway, name: str, since: str) -> None:
    path = quote(name.encode("utf-8", "surrogatepass"), safe="")
    r = requests.get(f"{gateway.url}/poll/{path}", params={"since": since.encode("utf-8", "surrogatepass")}, timeout=10)
    _clean(r)
    assert r.status_code in (200, 400, 404)


@LIVE
@given(any_text, st.one_of(st.none(), st.text(any_char, max_size=20)))
def test_json_publish_in_every_plane_is_202_and_readable_or_a_400(
    gateway: Gateway, data: str, event: str | None
) -> None:
    channel = "prop.json"
    before = requests.get(f"{gateway.url}/poll/{channel}", timeout=10).json()["cursor"]
    body = json.dumps({"data": data, "event": event})  # ASCII: a lone surrogate travels as its escape
    r = requests.post(
        f"{gateway.url}/publish/{channel}", data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=10
    )
    _clean(r)
    if _has_surrogate(data) or (event is not None and _has_surrogate(event)):
        assert r.status_code == 400
        return
    if r.status_code == 400:
        assert r.json()["error"] in ("invalid_event", "reserved_event")
        return
    assert r.status_code == 202
    events = requests.get(f"{gateway.url}/poll/{channel}", params={"since": before}, timeout=10).json()["events"]
    assert [(e["id"], e["data"], e["event"]) for e in events] == [(r.json()["id"], data, event or "message")]


@LIVE
@given(st.binary(max_size=600) | any_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_raw_publish_of_any_bytes_is_202_and_readable_or_a_400(gateway: Gateway, raw: bytes) -> None:
    channel = "prop.raw"
    before = requests.get(f"{gateway.url}/poll/{channel}", timeout=10).json()["cursor"]
    r = requests.post(
        f"{gateway.url}/publish/{channel}", data=raw, headers={**AUTH, "Content-Type": "text/plain"}, timeout=10
    )
    _clean(r)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        assert r.status_code == 400 and r.json()["error"] == "invalid_body"
        return
    assert r.status_code == 202
    events = requests.get(f"{gateway.url}/poll/{channel}", params={"since": before}, timeout=10).json()["events"]
    assert [e["data"] for e in events] == [text]


_values = st.sampled_from(
    ["0", "5", "+5", "5, 6", "5, 5", "-1", "abc", " 5", "chunked", "chunked, identity", "gzip", "close", "websocket"]
)
header_value = st.one_of(
    _values,
    _values,
    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30),
    st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=30),
)
_names = st.sampled_from(
    ["Content-Length", "Transfer-Encoding", "Host", "Connection", "Upgrade", "Last-Event-ID", "Origin", "Content-Type"]
)
header_name = st.one_of(_names, _names, _names, st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=12))


@st.composite
def request_head(draw: Any, paths: list[str] | None = None) -> bytes:
    methods = st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PUT"])
    method = draw(st.one_of(methods, methods, methods, st.text(st.characters(max_codepoint=255), max_size=6)))
    path = draw(
        st.one_of(
            st.sampled_from(
                paths or ["/healthz", "/poll/prop.h", "/publish/prop.h", "/sse/prop.h", "/nope", "/", "/status"]
            ),
            st.text(st.characters(min_codepoint=33, max_codepoint=255), max_size=40).map(lambda p: "/" + p),
        )
    )
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/9.9", ""]))
    headers = draw(st.lists(st.tuples(header_name, header_value), max_size=6))
    if draw(st.integers(0, 4)):  # most with the one Host an HTTP/1.1 request needs, to get past it
        headers.insert(draw(st.integers(0, len(headers))), ("Host", "127.0.0.1"))
    fold = draw(st.integers(0, 9)) == 0
    lines = [f"{method} {path} {version}".rstrip()] + [f"{n}: {v}" for n, v in headers]
    if fold and len(lines) > 1:
        lines.insert(2, " folded")
    lines.append(f"Authorization: Bearer {TOKEN}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + b"0\r\n\r\n"


def _first_status(port: int, head: bytes) -> int | None:
    """The status of the first answer, or None when the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n" not in data:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
    return int(data.split(b" ", 2)[1])


@LIVE
@given(request_head())
def test_raw_request_heads_get_a_clean_answer(gateway: Gateway, head: bytes) -> None:
    status = _first_status(gateway.port, head)
    assert status is None or 100 <= status < 500 or status in (501, 503), (status, head[:200])


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with [proxy] in front of a real upstream app: framing must not fool either."""
    up = Upstream()
    gw = Gateway({"proxy": {"upstream": up.url, "timeout_s": 3.0}}, tmp_path_factory.mktemp("proxied"))
    yield gw
    gw.stop()
    up.stop()
    assert "Traceback" not in gw.log()


@settings(LIVE, max_examples=30)  # each goes through the upstream app too
@given(request_head(paths=["/echo", "/echo/a%20b", "/socket", "/download?mb=0"]))
def test_raw_request_heads_through_the_proxy_get_a_clean_answer(proxied: Gateway, head: bytes) -> None:
    status = _first_status(proxied.port, head)
    assert status is None or 100 <= status < 500 or status in (501, 503), (status, head[:200])


@pytest.fixture(scope="module", autouse=True)
def _no_traceback_in_the_log(gateway: Gateway) -> Any:
    yield
    assert "Traceback" not in gateway.log()
