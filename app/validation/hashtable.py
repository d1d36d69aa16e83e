"""A compact hash set / map of 64- or 128-bit hashes in numpy arrays, for duplicate detection.

A Python dict of 16-byte keys costs about 100 bytes an entry; this table costs the key's 8 or 16
bytes plus the value's, so hundreds of thousands of examples fit in a few megabytes. Keys are
inserted a batch at a time with vectorised linear probing: one numpy pass per probe step for
the whole batch, instead of a Python call per key; the few keys still probing after that
finish one by one. Within a batch, earlier keys win: a key equal to an earlier one in the same
batch is reported as found, exactly as if they had been inserted one by one.

The table doubles when half full (its keys are then re-placed in one pass, in the order of
their home slots: see `_place_distinct`), up to the size that holds `max_entries` at 3/4
full; past that many entries new keys are no longer stored (lookups of stored keys still work)
and `capped` becomes True, so the report can say that duplicate detection covered only part of
the file. Which keys make it in when a batch crosses the cap is not defined.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["HashTable"]

# Linear probing's long tails cost vectorised rounds, so the table doubles at half full; only
# at its largest size does it fill up to 3/4.
_GROW_LOAD: Final = 0.5
_MAX_LOAD: Final = 0.75
_INITIAL_CAPACITY: Final = 1 << 12
# Keys still probing after the vectorised rounds thin out to this few finish one by one.
_SCALAR_TAIL: Final = 8

U64 = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]


class HashTable:
    """A set of keys (hi) or (hi, lo) of 64 bits each, or a map from them to integer values.

    `wide` selects 128-bit keys; `value_dtype` (np.uint32, np.uint64 or None for a set) the
    values. `max_entries` bounds the memory: about max_entries / 0.75 * bytes per slot.
    """

    def __init__(
        self, max_entries: int, *, wide: bool = True, value_dtype: type[Any] | None = None
    ) -> None:
        self.max_entries = max_entries
        self.size = 0
        self.capped = False
        self._wide = wide
        self._value_dtype = value_dtype
        self._max_capacity = _INITIAL_CAPACITY
        while self._max_capacity * _MAX_LOAD < max_entries:
            self._max_capacity *= 2
        self._allocate(_INITIAL_CAPACITY)

    @property
    def nbytes(self) -> int:
        return self._hi.nbytes + self._lo.nbytes + self._values.nbytes

    def max_nbytes(self) -> int:
        """The table's size at its largest."""
        return self.nbytes * self._max_capacity // self._hi.size

    def _allocate(self, capacity: int) -> None:
        self._mask = np.uint64(capacity - 1)
        self._hi: U64 = np.zeros(capacity, dtype=np.uint64)  # 0 marks an empty slot
        self._lo: U64 = np.zeros(capacity if self._wide else 0, dtype=np.uint64)
        self._values: npt.NDArray[Any] = np.zeros(
            capacity if self._value_dtype else 0, dtype=self._value_dtype or np.uint64
        )

    def insert(
        self, hi: U64, lo: U64 | None = None, values: npt.NDArray[Any] | None = None
    ) -> tuple[Bools, npt.NDArray[Any]]:
        """Insert the keys that are new; tell which were already there, and their values.

        Returns (found, stored): found[i] is True when key i was in the table before it (or
        earlier in this batch); stored[i] is the value kept for it (the first one inserted),
        zero where not found (empty for a set).
        """
        n = hi.size
        hi = hi | np.uint64(1)  # never 0, the empty marker
        if not self._wide:
            lo = None
        elif lo is None:
            raise ValueError("a wide table needs the keys' low words")
        self._reserve(n)
        found = np.zeros(n, dtype=np.bool_)
        stored = np.zeros(n if self._value_dtype else 0, dtype=self._values.dtype)
        slots = hi & self._mask
        pending = np.arange(n)
        while pending.size > _SCALAR_TAIL:
            s = slots[pending]
            table_hi = self._hi[s]
            same = table_hi == hi[pending]
            if lo is not None:
                same &= self._lo[s] == lo[pending]
            empty = table_hi == 0
            if same.any():
                found[pending[same]] = True
                if self._value_dtype:
                    stored[pending[same]] = self._values[s[same]]
            keep = ~same
            occupied = keep & ~empty
            slots[pending[occupied]] = (s[occupied] + np.uint64(1)) & self._mask
            if empty.any():
                self._claim(pending, s, np.flatnonzero(empty), keep, hi, lo, values)
            pending = pending[keep]
        for i in pending.tolist():
            self._insert_one(i, int(slots[i]), hi, lo, values, found, stored)
        return found, stored

    def _claim(
        self,
        pending: npt.NDArray[np.intp],
        s: U64,
        candidates: npt.NDArray[np.intp],
        keep: Bools,
        hi: U64,
        lo: U64 | None,
        values: npt.NDArray[Any] | None,
    ) -> None:
        """Store the keys that reached an empty slot: the earliest one per slot wins.

        The losers stay pending at the same slot and, next round, find the winner there (the
        same key: found) or probe on. Keys that no longer fit are dropped (not found).
        """
        room = self.max_entries - self.size
        if room <= 0:
            keep[candidates] = False
            self.capped = True
            return
        _, first = np.unique(s[candidates], return_index=True)
        if first.size > room:
            first = np.sort(first)[:room]
            self.capped = True
        winners = candidates[first]
        self._store(s[winners], pending[winners], hi, lo, values)
        keep[winners] = False

    def _store(
        self,
        slots: npt.NDArray[Any],
        keys: npt.NDArray[np.intp],
        hi: U64,
        lo: U64 | None,
        values: npt.NDArray[Any] | None,
    ) -> None:
        """Put keys[i] (an index into hi, lo, values) into the empty slot slots[i]."""
        self._hi[slots] = hi[keys]
        if lo is not None:
            self._lo[slots] = lo[keys]
        if self._value_dtype and values is not None:
            self._values[slots] = values[keys]
        self.size += int(keys.size)

    def _insert_one(
        self,
        i: int,
        slot: int,
        hi: U64,
        lo: U64 | None,
        values: npt.NDArray[Any] | None,
        found: Bools,
        stored: npt.NDArray[Any],
    ) -> None:
        key_hi = hi[i]
        key_lo = None if lo is None else lo[i]
        mask = int(self._mask)
        while True:
            table_hi = self._hi[slot]
            if table_hi == 0:
                if self.size >= self.max_entries:
                    self.capped = True
                    return
                self._hi[slot] = key_hi
                if key_lo is not None:
                    self._lo[slot] = key_lo
                if self._value_dtype and values is not None:
                    self._values[slot] = values[i]
                self.size += 1
                return
            if table_hi == key_hi and (key_lo is None or self._lo[slot] == key_lo):
                found[i] = True
                if self._value_dtype:
                    stored[i] = self._values[slot]
                return
            slot = (slot + 1) & mask

    def _reserve(self, incoming: int) -> None:
        capacity = self._hi.size
        wanted = capacity
        while (self.size + incoming) > wanted * _GROW_LOAD and wanted < self._max_capacity:
            wanted *= 2
        if wanted == capacity:
            return
        occupied = np.flatnonzero(self._hi)
        old_hi = self._hi[occupied]
        old_lo = self._lo[occupied] if self._wide else None
        old_values = self._values[occupied] if self._value_dtype else None
        self._allocate(wanted)
        del occupied
        size = self.size
        self.size = 0
        self._place_distinct(old_hi, old_lo, old_values)
        assert self.size == size

    def _place_distinct(self, hi: U64, lo: U64 | None, values: npt.NDArray[Any] | None) -> None:
        """Fill the empty table with distinct keys, without probing round after round.

        Taken in the order of their home slots, linear probing puts each key at its home slot
        or just after the key before, whichever is later: position[i] = max(home[i],
        position[i - 1] + 1), a running maximum. Keys that run past the last slot are
        inserted the usual way, wrapping around.
        """
        homes = (hi & self._mask).astype(np.int64)
        order = np.argsort(homes, kind="stable")
        ranks = np.arange(order.size)
        positions = ranks + np.maximum.accumulate(homes[order] - ranks)
        fits = positions < self._hi.size
        self._store(positions[fits], order[fits], hi, lo, values)
        wrapped = order[~fits]
        if wrapped.size:
            self.insert(
                hi[wrapped],
                None if lo is None else lo[wrapped],
                None if values is None else values[wrapped],
            )
