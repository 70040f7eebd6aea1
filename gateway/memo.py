"""A bounded memo for answers about texts anyone may send (request heads, channel lists): short
keys only, and every entry forgotten at once when it is full, so memory stays bounded whatever
comes, and the hot path pays one dict lookup."""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["BoundedMemo"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(dict[K, V], Generic[K, V]):
    def __init__(self, entries: int, key_size: int) -> None:
        super().__init__()
        self.entries = entries  # then all are forgotten
        self.key_size = key_size  # longer keys are not kept

    def remember(self, key: K, value: V, size: int | None = None) -> None:
        """Keep `value` for `key` if the key (or `size`, its measure) is short enough."""
        if (len(key) if size is None else size) <= self.key_size:  # type: ignore[arg-type]
            if len(self) >= self.entries:
                self.clear()
            self[key] = value
