"""Key → row position for millions of keys in about 12 bytes per key, never confusing two keys.

Only a 64-bit hash of each key is kept, in a sorted ``uint64`` array with a parallel ``uint32``
array of positions (so at most 2**32 rows); keys added since the last merge wait in a small
dict and are merged into the arrays in bulk, once the dict holds 1/256 of the keys (at least
4,096): a lookup is a binary search, and adding a key costs an amortised copy of a few hundred
array slots. A whole batch of keys is looked up with one vectorised ``searchsorted``.

A hash can be shared by two keys, so a hash hit is only a candidate: the caller confirms it by
returning the key actually stored at that position (``key_at``). A key whose hash another key
already holds is kept whole in a small overflow dict. A collision therefore costs one extra
read; it can never make a new key look stored (which would silently drop a result).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

Key = str
KeyHash = Callable[[Key], int]

_MIN_RECENT = 4096
_RECENT_SHARE_SHIFT = 8  # merge once the recent keys are 1/256 of the merged ones
NOT_FOUND = -1


def hash_key(key: Key) -> int:
    """A 64-bit hash of ``key``, the same in every process (unlike the randomised ``hash()``)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class KeyIndex:
    """Maps keys to non-negative row positions; the caller supplies the stored keys on demand.

    ``key_hash`` must return an int in [0, 2**64); tests inject a weak one to force collisions.
    Not thread-safe.
    """

    def __init__(self, key_hash: KeyHash | None = None) -> None:
        self.key_hash: KeyHash = key_hash or hash_key  # hashes given to find and add come from it
        self.clear()

    def clear(self) -> None:
        """Forget every key."""
        self._hashes = np.empty(0, dtype=np.uint64)  # sorted; one key per hash
        self._positions = np.empty(0, dtype=np.uint32)  # position of the key of each hash
        self._recent: dict[int, int] = {}  # hash → position, not merged yet; disjoint from _hashes
        self._overflow: dict[Key, int] = {}  # keys whose hash another key holds

    def __len__(self) -> int:
        return len(self._hashes) + len(self._recent) + len(self._overflow)

    def find(
        self, keys: Sequence[Key], hashes: Sequence[int], key_at: Callable[[int], Key | None]
    ) -> list[int]:
        """The position of each key, or NOT_FOUND. ``key_at(position)`` returns the key stored at
        a position (None if it cannot be read, which counts as no match)."""
        found = []
        overflow = self._overflow
        for key, holder in zip(keys, self._holders(hashes)):
            position = overflow.get(key, NOT_FOUND) if overflow else NOT_FOUND
            if position == NOT_FOUND and holder != NOT_FOUND and key_at(holder) == key:
                position = holder
            found.append(position)
        return found

    def add(self, keys: Sequence[Key], hashes: Sequence[int], positions: Iterable[int]) -> None:
        """Index ``keys`` (distinct, none of them indexed yet, as ``find`` said) at ``positions``."""
        recent = self._recent
        for key, key_hash, position, holder in zip(keys, hashes, positions, self._merged_holders(hashes)):
            if holder != NOT_FOUND or key_hash in recent:
                self._overflow[key] = position  # a true collision: another key has this hash
            else:
                recent[key_hash] = position
        if len(recent) >= max(_MIN_RECENT, len(self._hashes) >> _RECENT_SHARE_SHIFT):
            self._merge_recent()

    def _holders(self, hashes: Sequence[int]) -> list[int]:
        """Position of the key that holds each hash, or NOT_FOUND."""
        merged = self._merged_holders(hashes)
        if not self._recent:
            return merged
        recent = self._recent
        return [recent.get(key_hash, holder) for key_hash, holder in zip(hashes, merged)]

    def _merged_holders(self, hashes: Sequence[int]) -> list[int]:
        if not len(self._hashes) or not hashes:
            return [NOT_FOUND] * len(hashes)
        wanted = np.array(hashes, dtype=np.uint64)
        slots = np.minimum(np.searchsorted(self._hashes, wanted), len(self._hashes) - 1)
        hit = self._hashes[slots] == wanted
        return np.where(hit, self._positions[slots].astype(np.int64), NOT_FOUND).tolist()

    def _merge_recent(self) -> None:
        count = len(self._recent)
        hashes = np.fromiter(self._recent.keys(), dtype=np.uint64, count=count)
        positions = np.fromiter(self._recent.values(), dtype=np.uint32, count=count)
        order = np.argsort(hashes)
        hashes, positions = hashes[order], positions[order]
        slots = np.searchsorted(self._hashes, hashes)
        self._hashes = np.insert(self._hashes, slots, hashes)
        self._positions = np.insert(self._positions, slots, positions)
        self._recent = {}
