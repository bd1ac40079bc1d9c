"""Per-sequence KV caches kept between worker calls, bounded by total cached tokens (LRU).

A sequence's entry holds its token ids and, per layer, the keys and values of a prefix of them.
An owner that works in steps (the reward worker) also keeps the steps and one score per step, and
then needs the steps, not only the tokens, to be a prefix for a hit. Entries are never modified
after `put`: a child that starts from a parent reads the parent's tensors into its own batch (a
copy), so any number of children can fork one parent and the parent stays held for the rest.
Nothing here knows about search algorithms; ids are opaque strings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CachedSequence:
    """The cache of one sequence: `keys[l]` / `values[l]` are `[kv_heads, cached, head_dim]`.

    `cached <= len(token_ids)`: the newest sampled token(s) may not have been fed through the model
    yet (a step's last token is sampled but never encoded); whoever continues the sequence encodes
    `token_ids[cached:]`.
    """

    token_ids: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    steps: tuple[str, ...] = ()
    """The steps the tokens render, for owners whose hits must extend them (else empty)."""
    scores: tuple[float, ...] = ()
    """One value per step the owner keeps with the cache (the reward worker's rewards)."""

    @property
    def cached(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    """Lookups of a named parent that found nothing usable: absent (never held, evicted) or
    mismatched. Requests without a parent are not lookups."""
    mismatches: int
    """Misses where the parent was held but its tokens (or steps) were not a prefix of the
    request's."""
    evictions: int
    sequences: int
    cached_tokens: int
    capacity_tokens: int


class KVCacheStore:
    """Sequence id -> `CachedSequence`, evicting least recently used entries beyond a token budget.

    `capacity_tokens=0` disables caching (every lookup misses), which is how tests and benchmarks
    get the recompute path with the same worker code.
    """

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[str, CachedSequence] = OrderedDict()
        self._tokens = 0
        self.hits = self.misses = self.mismatches = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._entries

    @property
    def cached_tokens(self) -> int:
        return self._tokens

    def fork(
        self, parent_id: str, token_ids: Sequence[int], steps: Sequence[str] | None = None
    ) -> CachedSequence | None:
        """The parent's entry if its tokens are a prefix of `token_ids` (the child's) and, when
        `steps` is given, its steps a prefix of `steps`; else None.

        Counts a hit or a miss and marks the parent recently used. The entry is shared, read-only:
        the caller copies what it needs (building a batch does), so one parent can seed many
        children in one call and across calls.
        """
        entry = self._entries.get(parent_id)
        if entry is None:
            self.misses += 1
            return None
        held = entry.token_ids
        if (
            len(held) > len(token_ids)
            or tuple(token_ids[: len(held)]) != held
            or (steps is not None and tuple(steps[: len(entry.steps)]) != entry.steps)
        ):
            self.misses += 1
            self.mismatches += 1
            return None
        self._entries.move_to_end(parent_id)
        self.hits += 1
        return entry

    def put(self, seq_id: str, entry: CachedSequence) -> None:
        """Hold `entry` under `seq_id` (replacing any old one), then evict LRU entries to fit."""
        self.release([seq_id])
        if not 0 < entry.cached <= self.capacity_tokens:
            return
        self._entries[seq_id] = entry
        self._tokens += entry.cached
        while self._tokens > self.capacity_tokens:
            _, old = self._entries.popitem(last=False)
            self._tokens -= old.cached
            self.evictions += 1

    def release(self, seq_ids: Iterable[str]) -> None:
        """Forget these sequences (finished or pruned searches); unknown ids are ignored."""
        for sid in seq_ids:
            old = self._entries.pop(sid, None)
            if old is not None:
                self._tokens -= old.cached

    def release_prefix(self, prefix: str) -> int:
        """Forget every sequence whose id starts with `prefix` (one search's ids share one);
        returns how many were held."""
        gone = [sid for sid in self._entries if sid.startswith(prefix)]
        self.release(gone)
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            mismatches=self.mismatches,
            evictions=self.evictions,
            sequences=len(self._entries),
            cached_tokens=self._tokens,
            capacity_tokens=self.capacity_tokens,
        )
