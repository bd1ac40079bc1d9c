"""Lua scripts: every read-check-write on one search runs server-side, so it is atomic.

Each job script gets the search's keys as KEYS = [job, checkpoint, events, cancel] (one hash tag,
one cluster slot); each batch script gets the batch's keys as KEYS = [meta, items, counted,
results] (see `redis_keys`). Scripts use the server clock (TIME), so orchestrators' clock skew
cannot decide who owns a lease. Times are stored as seconds with six decimals. Needs Redis >= 7.0
(stream ids `0-*`, non-deterministic commands in scripts).
"""

from __future__ import annotations

from lodestar.orchestrator.state_store.base import BATCH_COUNTED, FINISHED

_PRELUDE = (
    "local FINISHED = {"
    + ", ".join(f"{status.value} = true" for status in sorted(FINISHED))
    + "}\n"
    + """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function stamp(x) return string.format('%.6f', x) end
local function inherit_ttl(key)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
"""
)

CREATE_JOB = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local created = stamp(now())
redis.call('HSET', KEYS[1], 'status', 'queued', 'created_at', created, unpack(ARGV, 3))
if ARGV[1] == '1' then  -- DEL first: a stray key's TTL must not carry over
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'g', '0', 'd', ARGV[2])
end
return created
"""
)
"""The job and its generation-0 checkpoint. ARGV: '1' to write the checkpoint (else '0'), its
data, then the spec's field/value pairs. Returns created_at, or false if the job exists."""

UPDATE_JOB = (
    _PRELUDE
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing'} end
if FINISHED[current] then return {'finished', current} end
local target = ARGV[1]
if target == '' then
  target = current
elseif not string.find(',' .. ARGV[2] .. ',', ',' .. current .. ',', 1, true) then
  return {'invalid', current}
end
redis.call('HSET', KEYS[1], 'status', target)
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
if target == 'running' and redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', stamp(now()))
end
if FINISHED[target] then
  redis.call('HSET', KEYS[1], 'finished_at', stamp(now()))
  redis.call('HDEL', KEYS[1], 'lease_expires_at')
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)
"""ARGV: target status ('' keeps it), statuses allowed before it (comma-separated), TTL in ms
for a finished job, then field/value pairs to set."""

CLAIM_JOB = (
    _PRELUDE
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing'} end
if FINISHED[current] then return {'finished', current} end
local t = now()
local holder = redis.call('HGET', KEYS[1], 'owner')
local expires = tonumber(redis.call('HGET', KEYS[1], 'lease_expires_at') or '')
if expires and expires > t and (ARGV[3] == '1' or holder ~= ARGV[1]) then
  return {'held', stamp(expires)}
end
local lease = stamp(t + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_expires_at', lease)
if current == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running')
  redis.call('HSETNX', KEYS[1], 'started_at', stamp(t))
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)
"""ARGV: owner, lease seconds, '1' to claim only an expired lease (orphans) else '0'."""

RENEW_LEASE = (
    _PRELUDE
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing'} end
if FINISHED[current] then return {'finished', current} end
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder ~= ARGV[1] then return {'lost', holder or ''} end
local lease = stamp(now() + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'lease_expires_at', lease)
return {'ok', lease}
"""
)
"""ARGV: owner, lease seconds."""

_CHECKPOINT_CAS = """
local stored = tonumber(redis.call('HGET', KEYS[2], 'g') or '0')
local status = redis.call('HGET', KEYS[1], 'status')
if status and FINISHED[status] then return {0, stored, status} end
if tonumber(ARGV[1]) ~= stored + 1 then return {0, stored} end
redis.call('HSET', KEYS[2], 'g', ARGV[1], 'd', ARGV[2])
"""
"""Compare-and-set of the checkpoint (ARGV[1] generation, ARGV[2] data); returns on refusal."""

SAVE_CHECKPOINT = (
    _PRELUDE
    + _CHECKPOINT_CAS
    + """
return {1, stored + 1}
"""
)
"""ARGV: generation, data. Returns {1, generation} or {0, stored generation[, finished status]}."""

RECORD_STEP = (
    _PRELUDE
    + _CHECKPOINT_CAS
    + """
local id = redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[3], '0-*', 't', '0', 'd', ARGV[4])
inherit_ttl(KEYS[3])
return {1, stored + 1, redis.call('EXISTS', KEYS[4]), id}
"""
)
"""SAVE_CHECKPOINT, then a progress event, atomically. ARGV: generation, data, max length, event.
Returns {1, generation, cancel flag, stream id} or SAVE_CHECKPOINT's refusal."""

APPEND_EVENT = (
    _PRELUDE
    + """
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if last[1] and last[1][2][2] == '1' then return false end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[1], '0-*', 't', ARGV[2], 'd', ARGV[3])
inherit_ttl(KEYS[3])
return id
"""
)
"""ARGV: max length, '1' if terminal else '0', data. Returns the stream id '0-<offset>', or
false when the log already ended with a terminal event."""

REQUEST_CANCEL = (
    _PRELUDE
    + """
redis.call('SET', KEYS[4], '1', 'KEEPTTL')
inherit_ttl(KEYS[4])
return 1
"""
)

HOLD_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
"""A named lease (KEYS[1]): take it if free or renew it if ARGV[1] holds it, for ARGV[2] ms
(the key's own expiry is the lease, on the server's clock). Returns 1 if held, else 0."""

RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Drop the named lease KEYS[1] if ARGV[1] holds it."""

CREATE_BATCH = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local created = stamp(now())
redis.call('HSET', KEYS[1], 'size', ARGV[1], 'settings', ARGV[2], 'created_at', created, """
    + ", ".join(f"'{status.value}', 0" for status in BATCH_COUNTED)
    + """)
return created
"""
)
"""The batch record alone (items and jobs follow from Python). ARGV: size, settings JSON.
Returns created_at, or false if the batch exists."""

FINISH_BATCH_ITEM = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if not FINISHED[ARGV[3]] then return {'unfinished'} end
if redis.call('LINDEX', KEYS[2], ARGV[2]) ~= ARGV[1] then return {'stranger'} end
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then return {'counted'} end
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
local id = redis.call('XADD', KEYS[4], '0-*', 's', ARGV[1], 'i', ARGV[2], 'st', ARGV[3])
if redis.call('SCARD', KEYS[3]) >= tonumber(redis.call('HGET', KEYS[1], 'size')) then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
end
return {'ok', id}
"""
)
"""Count one finished item, once: the `counted` set guards against a retry (or reconcile) counting
it again. ARGV: search id, batch_index, terminal status, TTL in ms for a done batch. Returns
{'ok', result stream id}, or {'counted'} / {'missing'} / {'stranger'} (not this batch's item at
that index) / {'unfinished'} when nothing changed."""
