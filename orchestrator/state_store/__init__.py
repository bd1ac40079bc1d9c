"""Search-state store: job records, checkpoints, progress events and cancellation per search, and
batch records over many searches.

`open_state_store(url)` picks the backend: `memory://` for one process (nothing shared, nothing
survives), `redis://...` for the distributed runtime. Redis is imported only when asked for.
"""

from __future__ import annotations

from typing import Any

from lodestar.orchestrator.state_store.base import (
    BatchExists,
    BatchNotFound,
    BatchRecord,
    BatchResult,
    Checkpoint,
    InvalidTransition,
    JobExists,
    JobNotFound,
    JobRecord,
    JobSpec,
    JobStatus,
    LeaseLost,
    ProgressEvent,
    StaleWriter,
    StateStore,
    StateStoreError,
    StateStoreUnavailable,
    StoreConfig,
    StreamClosed,
)
from lodestar.orchestrator.state_store.memory import MemoryStateStore


def open_state_store(url: str, **settings: Any) -> StateStore:
    """A store for `url`; `settings` are fields of `StoreConfig` (or `RedisStoreConfig`)."""
    if url == "memory://":
        return MemoryStateStore(StoreConfig(**settings))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from lodestar.orchestrator.state_store.redis_store import (
            RedisStateStore,
            RedisStoreConfig,
        )

        return RedisStateStore(RedisStoreConfig(url=url, **settings))
    raise ValueError(f"unsupported state store url {url!r}: use memory:// or redis://host:port/db")


__all__ = [
    "BatchExists",
    "BatchNotFound",
    "BatchRecord",
    "BatchResult",
    "Checkpoint",
    "InvalidTransition",
    "JobExists",
    "JobNotFound",
    "JobRecord",
    "JobSpec",
    "JobStatus",
    "LeaseLost",
    "MemoryStateStore",
    "ProgressEvent",
    "StaleWriter",
    "StateStore",
    "StateStoreError",
    "StateStoreUnavailable",
    "StoreConfig",
    "StreamClosed",
    "open_state_store",
]
