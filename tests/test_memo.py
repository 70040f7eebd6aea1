"""gateway/memo.py: a memo for texts anyone may send stays bounded, whatever comes."""

from __future__ import annotations

from gateway.memo import BoundedMemo


def test_a_full_memo_forgets_everything_and_long_keys_are_not_kept() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(entries=3, key_size=4)
    for i, key in enumerate(["a", "b", "c"]):
        memo.remember(key, i, len(key))
    assert memo == {"a": 0, "b": 1, "c": 2}
    memo.remember("d", 3, 1)  # full: all forgotten, then this one kept
    assert memo == {"d": 3}
    memo.remember("toolong", 4, len("toolong"))
    memo.remember(("a", True), 5, 5)  # the size given is what counts, not the key's own length
    assert memo == {"d": 3}
