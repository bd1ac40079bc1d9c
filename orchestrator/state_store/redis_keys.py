"""Redis key layout. Everything of one search shares the hash tag `{<search_id>}`, so its keys sit
in one Redis Cluster slot and a Lua script may touch them all.

    lodestar:{<id>}:job         HASH    job record (see `redis_store` for the fields)
    lodestar:{<id>}:checkpoint  HASH    g = generation, d = algorithm state bytes
    lodestar:{<id>}:events      STREAM  ids 0-1, 0-2, ... (offset = sequence); fields t, d
    lodestar:{<id>}:cancel      STRING  "1" once cancellation is requested
    lodestar:jobs:unfinished    ZSET    search id -> lease expiry (creation time if never
                                        claimed): claimable when the score is in the past
    lodestar:<lease name>       STRING  a named lease's holder, expiring with the lease: e.g.
                                        lodestar:fleet:<name>:owner, the gateway that keeps
                                        a model fleet (`hold_lease`)
    lodestar:wake:<store>:<n>   STREAM  wakes shared stream reader n of one store object
                                        (`redis_stream_reader`); MAXLEN 1, expires 60 s after
                                        its last wake

A batch's keys share the hash tag `{<batch_id>}` (a slot of their own, whatever its items' slots):

    lodestar:batch:{<id>}:meta     HASH    size, settings (JSON), created_at, and one count per
                                           terminal status: succeeded, failed, cancelled
    lodestar:batch:{<id>}:items    LIST    search ids by batch_index (what reconcile walks)
    lodestar:batch:{<id>}:counted  SET     search ids already counted: the finish step's guard
    lodestar:batch:{<id>}:results  STREAM  ids 0-1, 0-2, ... in finish order; fields
                                           s = search id, i = batch_index, st = status
    lodestar:batches:open          SET     ids of batches written in full and perhaps not
                                           done: what `open_batch_items` sums over; done and
                                           expired ones are dropped when met

The `jobs:unfinished` index lives in its own slot, so scripts never touch it: it is updated
beside them and self-heals (ids of missing or finished jobs are dropped when met), as does
`batches:open`. Likewise a job and its batch are in different slots, so finishing a batch item
is two scripts, job first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SearchKeys:
    job: str
    checkpoint: str
    events: str
    cancel: str

    @classmethod
    def of(cls, prefix: str, search_id: str) -> SearchKeys:
        base = f"{prefix}:{{{search_id}}}"
        return cls(f"{base}:job", f"{base}:checkpoint", f"{base}:events", f"{base}:cancel")

    def all(self) -> list[str]:
        """In the order the Lua scripts expect them as KEYS."""
        return [self.job, self.checkpoint, self.events, self.cancel]


@dataclass(frozen=True, slots=True)
class BatchKeys:
    meta: str
    items: str
    counted: str
    results: str

    @classmethod
    def of(cls, prefix: str, batch_id: str) -> BatchKeys:
        base = f"{prefix}:batch:{{{batch_id}}}"
        return cls(f"{base}:meta", f"{base}:items", f"{base}:counted", f"{base}:results")

    def all(self) -> list[str]:
        """In the order the batch Lua scripts expect them as KEYS."""
        return [self.meta, self.items, self.counted, self.results]


def unfinished_index(prefix: str) -> str:
    return f"{prefix}:jobs:unfinished"


def lease_key(prefix: str, name: str) -> str:
    return f"{prefix}:{name}"


def wake_key(prefix: str, store: str, shard: int) -> str:
    return f"{prefix}:wake:{store}:{shard}"


def open_batches(prefix: str) -> str:
    return f"{prefix}:batches:open"
