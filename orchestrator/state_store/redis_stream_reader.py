"""Blocking stream reads shared by every waiter of one Redis store.

A follower of a search (StreamSearch, a waiter on a search run elsewhere, a batch results stream)
spends most of its life waiting for the next entry. Rather than one blocking XREAD, and so one
connection, per waiter, a store runs at most `shards` reader tasks: waited-on keys are spread over
them by hash, and each blocks on all of its keys at once (`XREAD BLOCK ... STREAMS k1 k2 ...`) and
hands each waiter the entries after its offset. Any number of waits use at most `shards`
connections, and one round trip serves every key of a shard that has news.

- A waiter whose key is missing from its reader's XREAD in flight wakes the reader through the
  shard's wake stream (one XADD; the reader blocks on it too), so a new key joins within a round
  trip, not a block slice. At most one wake per XREAD.
- A key whose waiters were all served stays in the next XREAD at the served offset, so a follower
  that comes back for the next entry finds its key already there (no wake), and while a reader
  runs a new wait sends no read of its own (`reading`): followers cost the ordinary pool nothing.
- Under a steady flow of entries a reader pauses briefly between rounds (`PAUSE_S_PER_KEY`), so
  one XREAD serves many entries instead of the loop spending itself re-sending long XREADs.
- A reader that fails (Redis down or hung) fails every waiter of its shard with the error and
  stops; the next waiter starts a new one.

Keys of many hash slots share one XREAD: this needs one Redis server (or a proxy in front of a
cluster), which is what `RedisStateStore` talks to.
"""

from __future__ import annotations

import asyncio
import uuid
import zlib
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from lodestar.orchestrator.state_store.redis_keys import wake_key

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: (id, fields)."""

WAKE_TTL_MS = 60_000
"""A wake stream expires this long after its last wake (a crashed store leaves nothing behind)."""

PAUSE_S_PER_KEY = 20e-6
MAX_PAUSE_S = 0.02
"""After a round that served entries a reader waits this long per key of its XREAD (at most
MAX_PAUSE_S) before the next: an XREAD costs about 5 us per key here (mostly redis-py packing
the command), so under a stream of entries readers spend at most a fifth of the loop on XREADs,
and an entry waits at most the pause more."""


def entry_offset(stream_id: bytes | str) -> int:
    """The sequence part of a `0-<n>` stream id: the entry's 1-based offset."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.partition("-")[2])


@dataclass(eq=False)
class _Waiter:
    after: int
    limit: int
    served: asyncio.Future[list[Entry]]


@dataclass(eq=False)
class _Shard:
    wake_key: str
    waiting: dict[str, set[_Waiter]] = field(default_factory=dict)
    lingering: dict[str, int] = field(default_factory=dict)
    """Keys whose waiters the last round served, at the served offset: in the next XREAD once."""
    reading: dict[str, int] | None = None
    """Key -> offset of the XREAD in flight; None while none is."""
    pausing: bool = False
    """Between a round that served entries and the next: every waiter will be in the next."""
    woken: bool = False
    wake_id: str = "0-0"
    reader: asyncio.Task[None] | None = None


class SharedStreamReader:
    """`wait(key, after, limit)` for any number of concurrent waiters over `shards` connections.

    `blocking` runs the XREADs (its pool needs `shards` connections); `wakes` sends the XADDs.
    """

    def __init__(
        self,
        blocking: Redis,
        wakes: Redis,
        *,
        prefix: str,
        shards: int,
        block_s: float,
        call_timeout_s: float,
    ) -> None:
        self._blocking = blocking
        self._wakes = wakes
        token = uuid.uuid4().hex[:16]
        self._shards = [_Shard(wake_key(prefix, token, i)) for i in range(shards)]
        self._block_ms = max(1, round(block_s * 1000))
        self._call_timeout_s = call_timeout_s

    @property
    def readers(self) -> int:
        """Reader tasks running now: the blocking connections in use."""
        return sum(1 for s in self._shards if s.reader is not None and not s.reader.done())

    @staticmethod
    def _alive(shard: _Shard) -> bool:
        """The shard's reader runs, on this event loop (one left pending by a closed loop never
        finishes: a store object reused under a new loop starts new readers)."""
        reader = shard.reader
        return (
            reader is not None
            and not reader.done()
            and reader.get_loop() is asyncio.get_running_loop()
        )

    @property
    def waiters(self) -> int:
        return sum(len(w) for s in self._shards for w in s.waiting.values())

    def reading(self, key: str) -> bool:
        """True while a reader serves `key`'s shard (its XREAD in flight, or about to be sent):
        a wait then needs no read of its own first, since that XREAD (or the one a wake makes it
        send) returns at once what is already there. So a follower coming back for its next
        entry, or a burst of new ones, costs no command on the ordinary pool (at most one wake
        per XREAD). Such a wait hears of a hung Redis when that XREAD times out."""
        shard = self._shard(key)
        return self._alive(shard) and (shard.pausing or shard.reading is not None)

    async def wait(self, key: str, after: int, limit: int) -> list[Entry]:
        """The first (at most `limit`) entries of stream `key` after offset `after`, once there
        is one. Raises the reader's error (a redis-py or timeout error) if it fails meanwhile;
        the caller bounds the wait."""
        shard = self._shard(key)
        waiter = _Waiter(after, limit, asyncio.get_running_loop().create_future())
        shard.waiting.setdefault(key, set()).add(waiter)
        try:
            if not self._alive(shard):
                shard.reading, shard.pausing = None, False
                shard.reader = asyncio.create_task(self._read(shard), name="redis-stream-reader")
            elif self._missing(shard, key, after) and not shard.woken:
                shard.woken = True
                await self._wake(shard)
            return await waiter.served
        finally:
            if waiter.served.done() and not waiter.served.cancelled():
                waiter.served.exception()  # retrieved: a failed wake may have left it unread
            waiters = shard.waiting.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del shard.waiting[key]

    async def close(self) -> None:
        readers = [s.reader for s in self._shards if s.reader is not None]
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for shard in self._shards:
            self._fail(shard, RedisConnectionError("state store closed"))

    async def _read(self, shard: _Shard) -> None:
        try:
            while shard.waiting:
                offsets = {k: min(w.after for w in ws) for k, ws in shard.waiting.items()}
                for key, offset in shard.lingering.items():
                    offsets.setdefault(key, offset)
                shard.lingering = {}
                count = max(w.limit for ws in shard.waiting.values() for w in ws)
                streams = {key: f"0-{offset}" for key, offset in offsets.items()}
                streams[shard.wake_key] = shard.wake_id
                shard.reading, shard.woken = offsets, False
                try:
                    async with asyncio.timeout(self._call_timeout_s):
                        reply = await self._blocking.xread(
                            streams, count=count, block=self._block_ms
                        )
                finally:
                    shard.reading = None
                served = False
                for raw_key, entries in reply or []:
                    key = raw_key.decode()
                    if key == shard.wake_key:
                        shard.wake_id = entries[-1][0].decode()
                    else:
                        served = self._serve(shard, key, entries, offsets[key]) or served
                if served:  # busy: let entries gather rather than spend the loop on XREADs
                    shard.pausing = True
                    try:
                        await asyncio.sleep(min(len(offsets) * PAUSE_S_PER_KEY, MAX_PAUSE_S))
                    finally:
                        shard.pausing = False
        except Exception as exc:  # Redis down or hung: every waiter of the shard hears of it
            self._fail(shard, exc)

    def _shard(self, key: str) -> _Shard:
        return self._shards[zlib.crc32(key.encode()) % len(self._shards)]

    @staticmethod
    def _missing(shard: _Shard, key: str, after: int) -> bool:
        """True when the XREAD in flight would not return `key`'s entries after `after`."""
        return shard.reading is not None and shard.reading.get(key, after + 1) > after

    def _serve(self, shard: _Shard, key: str, entries: list[Entry], read_from: int) -> bool:
        """Hand `entries` (the stream after offset `read_from`) to the key's waiters; True if any
        got some. A waiter that joined the XREAD in flight asking for earlier entries (its
        `after` below `read_from`: e.g. a follower whose last wait timed out just as it was
        served) is not served from it, which would skip the entries in between: the next round
        reads from its offset."""
        waiters = shard.waiting.get(key)
        if not waiters:  # a lingering key nobody came back for: its follower reads them itself
            return False
        served = False
        for waiter in list(waiters):
            if waiter.after < read_from:
                continue
            got = [e for e in entries if entry_offset(e[0]) > waiter.after][: waiter.limit]
            if got:
                waiters.discard(waiter)
                if not waiter.served.done():
                    waiter.served.set_result(got)
                    served = True
        if not waiters:
            del shard.waiting[key]
            shard.lingering[key] = entry_offset(entries[-1][0])
        return served

    def _fail(self, shard: _Shard, exc: Exception) -> None:
        for waiters in shard.waiting.values():
            for waiter in waiters:
                if not waiter.served.done():
                    waiter.served.set_exception(exc)
        shard.waiting.clear()
        shard.lingering.clear()

    async def _wake(self, shard: _Shard) -> None:
        async with self._wakes.pipeline(transaction=False) as pipe:
            pipe.xadd(shard.wake_key, {"w": "1"}, maxlen=1)
            pipe.pexpire(shard.wake_key, WAKE_TTL_MS)
            await pipe.execute()
