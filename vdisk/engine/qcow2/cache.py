"""A bounded LRU cache for metadata tables (L2 tables, refcount blocks).

An optional `on_evict(key, value)` hook runs before an entry is dropped for space (the
image writes a dirty L2 table back there); if it raises, the entry stays cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `capacity` entries; the least recently used one is dropped first."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        self.capacity = max(1, capacity)
        self.on_evict = on_evict
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: K, value: V) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            old, v = next(iter(self._d.items()))
            if self.on_evict is not None:
                self.on_evict(old, v)
            self._d.pop(old, None)

    def drop(self, key: K) -> None:
        self._d.pop(key, None)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d
