"""Source config mistakes stop start-up with one line naming the key; helpers in sources.base."""

from __future__ import annotations

import pytest

from gateway.config import from_mapping
from gateway.errors import ConfigError
from gateway.sources.base import RecentIds, expand_env, public_url


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"kind": "mqtt", "url": "http://x", "channel": "a"}, 'sources[0].kind: must be "sse", "poll" or "websocket"'),
        ({"kind": "sse", "url": "ws://x/e", "channel": "a"}, "sources[0].url: a sse source needs an http(s):// URL"),
        ({"kind": "sse", "url": "x/e", "channel": "a"}, "sources[0].url: must be an absolute"),
        ({"kind": "poll", "url": "http://x", "channel": "bad name"}, "sources[0].channel: 'bad name' is not a valid"),
        ({"kind": "poll", "url": "http://x", "channel": "a", "interval": 0}, "interval: 0.0 is out of range"),
        ({"kind": "sse", "url": "http://x", "channel": "a", "mode": "sometimes"}, 'sources[0].mode: must be "eager"'),
        ({"kind": "sse", "url": "http://x", "channel": "a", "colour": 1}, "sources[0].colour: unknown key"),
        ({"kind": "sse", "url": "http://x", "channel": "a", "headers": {"A": 1}}, "must be a table of strings"),
    ],
)
def test_bad_source_config_is_one_clear_line(source: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"sources": [source]})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_websocket_source_accepts_http_and_ws_urls() -> None:
    cfg = from_mapping(
        {
            "sources": [
                {"kind": "websocket", "url": "ws://h/s", "channel": "a"},
                {"kind": "websocket", "url": "http://h/s", "channel": "b"},
            ]
        }
    )
    assert [s.kind for s in cfg.sources] == ["websocket", "websocket"]


def test_expand_env_and_public_url() -> None:
    assert expand_env("Bearer ${T}-${U}", {"T": "abc"}) == "Bearer abc-"
    assert expand_env("no $T refs", {"T": "x"}) == "no $T refs"
    assert (
        public_url("https://user:pw@h.example:8443/feed?key=secret&n=2")
        == "https://***@h.example:8443/feed?key=***&n=2"
    )


def test_recent_ids_is_bounded_and_forgets_oldest_first() -> None:
    ids = RecentIds(3)
    for key in "abcd":
        ids.add(key)
    assert len(ids) == 3 and "a" not in ids and "d" in ids
