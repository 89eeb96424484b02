"""A small cache for what clients send again and again (a system prompt, a tool set), bounded
by entries and by bytes, whatever the clients send.

Keys are 16-byte digests (`digest`), so a megabyte-long input costs the cache 16 bytes of
key; values are charged the size the caller states, and one larger than a quarter of the
budget is never kept (it would push out everything else for one client's benefit).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any


def digest(*parts: str) -> bytes:
    """16 bytes naming `parts` (each length-prefixed, so no two lists of parts share one)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


class BoundedCache:
    """Least recently used first out, at most `max_entries` values and `max_bytes` bytes."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: Any, size: int) -> None:
        """Keep `value` (charged `size` bytes) unless it is over a quarter of the budget."""
        if size > self.max_bytes // 4:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[key] = (value, size)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self.bytes -= self._items.popitem(last=False)[1][1]


def text_size(text: str) -> int:
    """Bytes a str takes in memory, near enough (1, 2 or 4 per character, plus its header)."""
    width = 1 if text.isascii() else 4  # an upper bound for non-ASCII text
    return 64 + len(text) * width
