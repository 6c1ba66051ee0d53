"""The data layout of ``RedisIdempotencyStore``: its keys, its hash fields, its Lua scripts (one per primitive).

No I/O here: the store registers the scripts on its client and encodes records with the functions below.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from ..types.exceptions import IdempotencyRecordCorruptedError
from .record import IdempotencyRecord, RecordState

# Data layout. Each record key gets two Redis keys, sharing one Redis Cluster hash tag:
#   key_prefix + "{" + tag + "}"            the record: a hash
#   key_prefix + "{" + tag + "}:journal"    its journal (when it has one): a list of entries, oldest first
# where tag is the record key with "%", "{" and "}" escaped as %25, %7B and %7D ("%" for the empty key). Redis Cluster
# (and Valkey) hashes only the text between a key's first "{" and the first "}" after it, when that is not empty: the
# escaped tag holds no brace and is never empty, so the hash tag is always exactly the tag, the record and its journal
# always share a slot (a script may touch both), and keys of different invocations spread over every slot. Keys are
# scope#digest and a scope is the caller's string: escaping, rather than the raw key, keeps a scope holding braces
# from cutting the tag short (all its keys in one slot) or emptying it (then Redis hashes the whole key, and a
# record and its journal land in different slots: CROSSSLOT). key_prefix may not hold a brace, for the same reason.
#
# The record's fields (all text but payload, which is bytes):
#   status         IN_PROGRESS | COMPLETED | CANCELLED (a cancelled run's tombstone)
#   owner          the claim's owner id
#   version        unique to the write (record.version); take_over compares it
#   lease_seconds  record.lease_seconds (Python repr of the float: exact when read back; 0 is a yielded claim)
#   expires_at     record.expires_at, seconds since the epoch on the writer's clock (repr, exact); a claim compares a
#                  COMPLETED record's with the caller's now
#   fingerprint, payload, checkpoint   present only when not None
#   cancelled      '1', present only when record.cancelled: on an IN_PROGRESS record, someone asked for the run to be
#                  cancelled (the cancel script). Its presence is the mark: every fence refuses a hash holding it
#                  whatever its value, and get reads any value but '1' as corrupted.
#   appended       the id of the owner's last journal append, once it appended (see the append script)
# A hash rather than one encoded string: the scripts compare status, owner, version and expiry without decoding
# anything (no cjson/cmsgpack in Lua), renew rewrites a few small fields instead of the whole payload, and the
# record is readable with redis-cli (HGETALL). A hash of the unreleased earlier layouts (`lease`, no `version`; keys
# without the hash tag) reads as corrupted or is never read: there is nothing to migrate.
#
# The journal lives with the claim's lineage: a fresh claim (of a key that is free, holds a COMPLETED record that
# expired, or a CANCELLED tombstone) deletes it, complete and release delete it; take_over, renew, cancel and a claim
# retried by its own owner keep it. Only the owner of an IN_PROGRESS record that is not marked cancelled appends to
# it or truncates it, the fence and the write in one script.
#
# Cancels: the cancel script marks an IN_PROGRESS record (the `cancelled` field) and changes nothing else: not the
# version (a mark is no heartbeat: a waiter watching the version still judges the owner by its own writes), not the
# TTL, not the journal. From then on renew, append and truncate refuse the owner (it learns of the cancel at its next
# heartbeat, by that refusal), and complete accepts only a CANCELLED tombstone from it, never a result. release and
# take_over ignore the mark: a takeover writes the record it is given, mark or none.
#
# Lifetime: every write sets the key's TTL with PEXPIRE, a duration in milliseconds (rounded up, at least 1) that the
# caller computes as expires_at - now: the claim's own `now`, time.time() for the other writes. The writer's clock
# only measures a difference between two readings of itself, and the server counts that duration down on its own
# clock, so no host's skew (minutes ahead or behind) deletes a running claim early or keeps a record late. (An
# absolute PEXPIREAT would be judged on the server's clock against the writer's: a host ten minutes behind would
# write claims Redis deletes ten minutes early.) A write whose expires_at is already past gets the minimum TTL, 1 ms:
# written, then deleted by Redis, instead of an error for a record that simply stopped counting. Redis keeps the TTL
# as a time of its own clock, and hands that time to replicas and its append-only file: keep the servers' clocks in
# sync (NTP), as a failover to a replica whose clock is off moves every deadline by the difference.
# The journal's TTL is always the record's: every script that sets the record's PEXPIRE sets the journal's to the same
# value (a PEXPIRE of a key that does not exist does nothing), and an append copies the record's PTTL onto the list it
# may just have created. Redis 7 freezes its clock inside a script, so both keys expire at the same millisecond.
#
# No script judges an IN_PROGRESS record by a clock: whether its owner is alive is the caller's judgement, by watching
# versions (IdempotencyRecord), and only take_over, a compare-and-set on the version, replaces another owner's claim.
#
# Every script gets the same two keys, KEYS[1] the record and KEYS[2] its journal (one slot: see above), so Redis
# Cluster routes it to the node that owns both, and each primitive is one atomic step there.

# claim: store the claim unless the key holds another owner's IN_PROGRESS record (whatever its age) or a COMPLETED
# record not yet expired at the caller's now. A CANCELLED tombstone never blocks a claim, whatever its expiry.
#   ARGV[1]   the claiming owner
#   ARGV[2]   now: the caller's clock, seconds since the epoch, compared with a COMPLETED record's expires_at
#   ARGV[3]   the claim's TTL in milliseconds
#   ARGV[4..] the claim's hash fields, as name, value, name, value, ...
#   returns   nil if the claim was stored (the caller owns the key), else the record in the way (HGETALL's flat list)
# Replaced: the same owner's IN_PROGRESS record (a claim retried after its first attempt landed: its journal stays,
# and so does a cancel's mark that landed in between, or the resent claim would erase a cancel its caller was told
# had landed), a COMPLETED record whose expires_at <= now, or a CANCELLED tombstone (a cancelled run is not resumed).
# Any other claim is fresh and starts without a journal (one left by a record that vanished without the scripts,
# evicted or deleted by hand, is not this claim's). A record the script cannot read (a status it does not know, a
# missing owner or version, a lease or expiry that is not a number, a mark that is not '1') is kept and returned: the
# caller reports it as corrupted instead of overwriting what it cannot read. HMGET raises WRONGTYPE on a key of
# another type.
_CLAIM = """
local unpack = unpack or table.unpack
local stored = redis.call('HMGET', KEYS[1], 'status', 'owner', 'version', 'lease_seconds', 'expires_at', 'cancelled')
local own, marked = false, false
if redis.call('EXISTS', KEYS[1]) == 1 then
    local status, owner, expires_at = stored[1], stored[2], tonumber(stored[5])
    local free = false
    local readable = owner and stored[3] and tonumber(stored[4]) ~= nil and expires_at ~= nil
    if readable and (not stored[6] or stored[6] == '1') then
        if status == 'IN_PROGRESS' then
            own = owner == ARGV[1]
            free = own
        elseif status == 'COMPLETED' then
            free = expires_at <= tonumber(ARGV[2])
        elseif status == 'CANCELLED' then
            free = true
        end
    end
    if not free then
        return redis.call('HGETALL', KEYS[1])
    end
    marked = own and stored[6] == '1'
    redis.call('DEL', KEYS[1])
end
if not own then
    redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if marked then
    redis.call('HSET', KEYS[1], 'cancelled', '1')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return nil
"""

# Resent writes. redis-py sends a command again when its connection fails before the reply arrives (the client's
# retry policy), and the first copy may have run. Versions are unique to a write, so take_over and complete find
# their own write in place by its version and report it as done, instead of reporting a takeover or a completion
# that landed as fenced off. (claim, renew, truncate and cancel land the same state again; append carries an id of
# its own. A renewal, append or truncation resent after a cancel marked the record in between is refused although
# its first copy landed: its owner learns of the cancel all the same, and stops.)

# take_over: replace the stored record only if its version is the one the caller judged (compare-and-set). The
# journal stays: the new owner resumes from it. A mark goes with the replaced record: the new one is marked only if
# the caller's record is (its hash fields then carry `cancelled`).
#   ARGV[1]   the judged version
#   ARGV[2]   the new record's version
#   ARGV[3]   the new record's TTL in milliseconds
#   ARGV[4..] the new record's hash fields, as name, value, ...
#   returns   1 if replaced (now, or by this very write before), 0 if the key holds another version or nothing
#             (nothing written)
_TAKE_OVER = """
local unpack = unpack or table.unpack
local stored = redis.call('HGET', KEYS[1], 'version')
if stored == ARGV[2] then
    return 1
end
if stored ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# complete: replace the owner's IN_PROGRESS record with the finished record (a COMPLETED result, or the CANCELLED
# tombstone of a cancelled run), fenced on owner and status, and on a marked record fenced on the new status too: a
# result never lands after a cancel was asked for, only the owner's tombstone does. The journal goes (a finished
# invocation keeps only its result, or its tombstone).
#   ARGV[1]   the owner
#   ARGV[2]   the finished record's version
#   ARGV[3]   the finished record's status
#   ARGV[4]   the finished record's TTL in milliseconds
#   ARGV[5..] the finished record's hash fields, as name, value, ...
#   returns   1 if written (now, or by this very write before), 0 if fenced off (taken over, completed, gone, or
#             marked cancelled and ARGV[3] is not CANCELLED)
_COMPLETE = """
local unpack = unpack or table.unpack
if redis.call('HGET', KEYS[1], 'version') == ARGV[2] then
    return 1
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 and ARGV[3] ~= 'CANCELLED' then
    return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# release: delete the owner's IN_PROGRESS record and its journal, fenced on owner and status (marked or not: an owner
# that cannot leave its tombstone frees the key this way).
#   ARGV[1]   the owner
#   returns   1 if deleted, 0 if fenced off
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# renew: a heartbeat, fenced on owner and status and refused on a marked record (that refusal is how its owner learns
# of the cancel): a new version, lease and expiry (set as given, earlier or later than before), the keys' TTL from that
# expiry, and the checkpoint if one is given. Payload, fingerprint and journal stay.
#   ARGV[1]   the owner
#   ARGV[2]   the TTL in milliseconds
#   ARGV[3]   the new version
#   ARGV[4]   the new lease_seconds (repr)
#   ARGV[5]   the new expires_at (repr)
#   ARGV[6]   '1' to store ARGV[7] as the checkpoint, '0' to keep the stored one
#   ARGV[7]   the checkpoint
#   returns   1 if renewed, 0 if fenced off (taken over, completed, gone, or marked cancelled)
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
    return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[3], 'lease_seconds', ARGV[4], 'expires_at', ARGV[5])
if ARGV[6] == '1' then
    redis.call('HSET', KEYS[1], 'checkpoint', ARGV[7])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# append: add an entry at the journal's end, fenced on owner and status and refused on a marked record (a cancelled
# run journals nothing more), and give the journal the record's TTL (the list may have just been created by this
# RPUSH). A record without a TTL (written by hand) leaves its journal without one. Appending is the one write that
# is not idempotent, and redis-py sends a command again when its reply was lost (a timeout, a dropped connection: the
# client's retry policy): the call's id, kept in the record's `appended` field, makes the resent command a no-op
# instead of a second copy of the entry. One id is enough: an owner appends one entry at a time (the journal's order
# is the order of its steps).
#   ARGV[1]   the owner
#   ARGV[2]   the entry (bytes)
#   ARGV[3]   the call's id, unique to it
#   returns   1 if appended (now or by the same call before), 0 if fenced off (or marked cancelled)
_APPEND = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
    return 0
end
if redis.call('HGET', KEYS[1], 'appended') == ARGV[3] then
    return 1
end
redis.call('HSET', KEYS[1], 'appended', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
else
    redis.call('PERSIST', KEYS[2])
end
return 1
"""

# truncate: keep the journal's first ARGV[2] entries, fenced on owner and status and refused on a marked record
# (LTRIM keeps the TTL; trimming a list to nothing deletes it).
#   ARGV[1]   the owner
#   ARGV[2]   how many entries to keep (>= 0)
#   returns   1 if truncated, 0 if fenced off (or marked cancelled)
_TRUNCATE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then
    return 0
end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
    return 0
end
local length = tonumber(ARGV[2])
if length == 0 then
    redis.call('DEL', KEYS[2])
else
    redis.call('LTRIM', KEYS[2], 0, length - 1)
end
return 1
"""

# cancel: mark the IN_PROGRESS record cancelled, whoever owns it: one field set, nothing else. The version stays (a mark
# is no heartbeat: a waiter judging the owner by its versions keeps judging it by its own writes), and so do the TTL
# (HSET keeps a key's TTL) and the journal. A record in another state, or none, or one the script cannot read (no
# owner or version, a lease or expiry that is not a number: the caller reports it as corrupted) is left as it is.
# Marking twice is marking once: a marked record is not written again (a resent cancel finds its own mark).
#   returns   the record after the call (HGETALL's flat list; empty when the key holds nothing)
_CANCEL = """
local stored = redis.call('HMGET', KEYS[1], 'status', 'owner', 'version', 'lease_seconds', 'expires_at', 'cancelled')
local readable = stored[2] and stored[3] and tonumber(stored[4]) ~= nil and tonumber(stored[5]) ~= nil
if stored[1] == 'IN_PROGRESS' and readable and not stored[6] then
    redis.call('HSET', KEYS[1], 'cancelled', '1')
end
return redis.call('HGETALL', KEYS[1])
"""

# journal: the journal's entries, in order; none when the key holds no record (a journal whose record vanished
# without the scripts, evicted or deleted by hand, belongs to nobody).
#   returns   the entries (a list of bytes)
_JOURNAL = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return {}
end
return redis.call('LRANGE', KEYS[2], 0, -1)
"""


def _hash_tag(key: str) -> str:
    """``key`` with ``%``, ``{`` and ``}`` escaped: no brace, so Redis Cluster hashes exactly it; never empty."""
    return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") or "%"


def _ttl_ms(expires_at: float, now: float) -> int:
    """``expires_at - now`` in milliseconds for PEXPIRE: rounded up (Redis never deletes a record early), at least 1.

    A record already past its expiry gets 1 ms: its write lands as any other, and Redis deletes it a millisecond later
    (a PEXPIRE of zero or less would delete the key inside the very script that wrote it).
    """
    return max(1, math.ceil((expires_at - now) * 1000))


def _claim_args(record: IdempotencyRecord, now: float) -> list[Any]:
    """``claim``'s ARGV: the claim's duration is from the caller's own ``now``, the reading its expires_at came from."""
    return [record.owner, repr(float(now)), _ttl_ms(record.expires_at, now), *_fields(record)]


def _write_args(head: list[str], record: IdempotencyRecord) -> Callable[[], list[Any]]:
    """ARGV of a write of ``record`` after ``head``, made just before the call is sent.

    ``time.time()`` is read then, on the thread that sends it: time spent queued is not added to the TTL.
    """
    return lambda: [*head, _ttl_ms(record.expires_at, time.time()), *_fields(record)]


def _renew_args(
    owner: str, version: str, lease_seconds: float, expires_at: float, checkpoint: str | None
) -> Callable[[], list[Any]]:
    """``renew``'s ARGV, made just before the call is sent (its TTL from then)."""
    return lambda: [
        owner,
        _ttl_ms(expires_at, time.time()),
        version,
        repr(float(lease_seconds)),
        repr(float(expires_at)),
        "0" if checkpoint is None else "1",
        checkpoint or "",
    ]


def _fields(record: IdempotencyRecord) -> list[str | bytes]:
    fields: list[str | bytes] = [
        "status",
        record.state.value,
        "owner",
        record.owner,
        "version",
        record.version,
        "lease_seconds",
        repr(float(record.lease_seconds)),
        "expires_at",
        repr(float(record.expires_at)),
    ]
    if record.fingerprint is not None:
        fields += ["fingerprint", record.fingerprint]
    if record.payload is not None:
        fields += ["payload", record.payload]
    if record.checkpoint is not None:
        fields += ["checkpoint", record.checkpoint]
    if record.cancelled:
        fields += ["cancelled", "1"]
    return fields


def _pairs(flat: Any) -> dict[bytes, bytes]:
    items = cast(list[bytes], flat)
    return dict(zip(items[::2], items[1::2], strict=True))


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str | None:
    value = fields.get(name)
    return None if value is None else value.decode()


def _mark(value: bytes | None) -> bool:
    """The ``cancelled`` field: absent, or ``1``; anything else is not a record the scripts wrote."""
    if value is not None and value != b"1":
        raise ValueError(f"cancelled is {value!r}, not '1'")
    return value is not None


def _from_fields(key: str, fields: Mapping[bytes, bytes]) -> IdempotencyRecord:
    try:
        return IdempotencyRecord(
            key=key,
            state=RecordState(fields[b"status"].decode()),
            owner=fields[b"owner"].decode(),
            version=fields[b"version"].decode(),
            lease_seconds=float(fields[b"lease_seconds"]),
            expires_at=float(fields[b"expires_at"]),
            fingerprint=_text(fields, b"fingerprint"),
            payload=fields.get(b"payload"),
            checkpoint=_text(fields, b"checkpoint"),
            cancelled=_mark(fields.get(b"cancelled")),
        )
    except (KeyError, TypeError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise IdempotencyRecordCorruptedError(key, f"malformed record: {type(e).__name__}: {e}") from e
