"""A bounded memo for answers about texts anyone may send (request heads, channel lists): short
keys only, and every entry forgotten at once when it is full, so memory stays bounded whatever
comes, and the hot path pays one dict lookup."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

__all__ = ["BoundedMemo"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedMemo(dict[K, V]):
    def __init__(self, entries: int, key_size: int) -> None:
        super().__init__()
        self.entries = entries  # then all are forgotten
        self.key_size = key_size  # longer keys are not kept

    def remember(self, key: K, value: V, size: int) -> None:
        """Keep `value` for `key` if its size (its text's length, say) is at most key_size."""
        if size <= self.key_size:
            if len(self) >= self.entries:
                self.clear()
            self[key] = value
