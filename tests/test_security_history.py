"""Issue 12, High 2 (last sentence): history has a byte budget per channel, not only a count."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from gateway.config import ConfigError, from_mapping
from gateway.hub import Hub, MemoryStore
from gateway.hub.memory import event_cost
from tests.clients import poll
from tests.helpers import TOKEN, Gateway


def test_memory_history_drops_oldest_past_max_bytes_and_readers_behind_get_a_gap() -> None:
    hub = Hub(MemoryStore(1000, 3600, max_bytes=10_000))
    ids = [hub.publish("c", "x" * 1000).id for i in range(30)]
    batch = hub.read("c", "0-0", 1000)
    assert batch.gap
    kept = sum(event_cost(e.event, e.data) for e in batch.events)
    assert kept <= 10_000 and len(batch.events) == 10_000 // event_cost("message", "x" * 1000)
    assert batch.events[-1].id == ids[-1]
    # A reader inside what is kept resumes cleanly.
    inside = batch.events[2].id
    assert not hub.read("c", inside, 1000).gap
    # Non-ASCII data counts its UTF-8 bytes, not its characters.
    assert event_cost("m", "é" * 10) == 20 + 1 + (event_cost("m", "") - 1)


def test_an_event_bigger_than_the_budget_is_still_kept_alone() -> None:
    hub = Hub(MemoryStore(1000, 3600, max_bytes=2_000))
    first = hub.publish("c", "small")
    big = hub.publish("c", "y" * 5_000)
    batch = hub.read("c", first.id, 10)
    assert [e.id for e in batch.events] == [big.id] and not batch.gap
    after = hub.publish("c", "next")
    assert [e.id for e in hub.read("c", big.id, 10).events] == [after.id]
    assert hub.read("c", first.id, 10).gap


def test_max_bytes_config_key() -> None:
    assert from_mapping({}).history.max_bytes == 4 * 1024 * 1024
    with pytest.raises(ConfigError, match="history.max_bytes"):
        from_mapping({"history": {"max_bytes": 10}})


def test_live_gateway_honours_max_bytes(start_gateway: Callable[..., Gateway]) -> None:
    gw = start_gateway({"history": {"size": 1000, "max_bytes": 32_768}})
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"}
    for i in range(40):
        r = requests.post(f"{gw.url}/publish/big", data=f"{i:04d}".encode() + b"z" * 2000, headers=auth, timeout=5)
        assert r.status_code == 202
    answer = poll(gw.url, "big", "0-0")
    assert answer["gap"] is True
    sizes = sum(len(e["data"]) + 200 for e in answer["events"])
    assert sizes <= 32_768 and len(answer["events"]) >= 10
    assert answer["events"][-1]["data"].startswith("0039")


def test_idempotency_keys_do_not_keep_event_data_past_the_byte_budget() -> None:
    import tracemalloc

    store = MemoryStore(1000, 3600, max_bytes=100_000)
    hub = Hub(store)
    first = hub.publish("c", "f" * 50_000, idempotency_key="k-first")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):  # 10 MB published, each with its own key; history keeps ~100 KB
        hub.publish("c", f"{i:04d}" + "d" * 50_000, idempotency_key=f"k{i}")
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 2_000_000, grown
    # The keys still work after their events left history.
    again = hub.publish("c", "f" * 50_000, idempotency_key="k-first")
    assert again.repeat and again.id == first.id
