"""The idempotency store contract, as a pytest suite you run against a store of your own.

Subclass ``StoreContract`` in a test module (its name must start with ``Test``) and override the ``store``
fixture; every ``test_*`` method then runs against your store:

```python
import pytest
from strands_py.testing.store_contract import StoreContract

class TestMyStore(StoreContract):
    @pytest.fixture
    def store(self):
        with MyIdempotencyStore(...) as store:  # empty, or at least without the keys the tests use ("contract#...")
            yield store
```

The tests are plain (synchronous) test methods that run the store's coroutines with ``asyncio.run``, each on an
event loop of its own, so no asyncio plugin is needed, and a store that only works on the loop that created it
fails, as it would under strands' sync ``agent(...)``. They use the real clock (``time.time()``) with offsets of
seconds, since a server's own expiry (Redis TTLs) follows the real clock.

The threaded races (claims, takeovers) carry the ``racing`` mark: register it (``markers = ["racing: ..."]``) if you
run pytest with ``--strict-markers``. A test double that is not atomic under threads (moto's DynamoDB backend, say)
cannot pass it; override the ``racing_store`` fixture to serialise access to it (``SerialisedCalls``), as the
real server's per-item atomicity would, rather than accept a flaky suite.

Set ``use_event_loop = True`` on the subclass to run every call inside the store's ``use_event_loop()`` block, as a
server's lifespan serves it (``RedisIdempotencyStore``: on redis-py's asyncio client).

This module needs pytest; ``strands_py.testing`` itself imports without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

try:
    import pytest
except ImportError as e:  # pragma: no cover - exercised without pytest only
    raise ImportError("strands_py.testing.store_contract needs pytest: pip install pytest") from e

from ..idempotency.base import IdempotencyStore
from ..idempotency.record import IdempotencyRecord, RecordState, new_version

T = TypeVar("T")


class SerialisedCalls:
    """Wraps an object (a boto3 client, say) so that its method calls run one at a time, under one lock.

    For a test double that is not atomic under threads: moto's DynamoDB backend checks a condition and then writes
    with nothing in between to stop another thread, so two conditional writes can both pass, which DynamoDB never
    allows. Serialising every call gives the store under test the guarantee the real server gives. Attributes that
    are not callable (``meta``, ...) pass through unchanged.
    """

    def __init__(self, inner: Any) -> None:
        """Wrap ``inner``."""
        self._inner = inner
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        """``inner``'s attribute; a callable one runs under the lock."""
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def serialised(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return serialised


def _claim(
    key: str,
    owner: str,
    *,
    now: float,
    lease: float = 60.0,
    ttl: float = 3600.0,
    fingerprint: str | None = "fp",
    checkpoint: str | None = None,
) -> IdempotencyRecord:
    return IdempotencyRecord(
        key, RecordState.IN_PROGRESS, owner, new_version(), lease, now + lease + ttl, fingerprint, None, checkpoint
    )


def _completed(key: str, owner: str, *, now: float, ttl: float = 3600.0, payload: bytes = b"z") -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, new_version(), 0.0, now + ttl, "fp", payload)


class StoreContract:
    """What every ``IdempotencyStore`` must do; subclass it as ``TestYourStore`` and override ``store``.

    Attributes:
        timeout_seconds: Bound on each test's store calls (a hung store fails instead of hanging the suite).
        race_contenders: Threads racing for one key in the race tests.
        use_event_loop: Run every call inside the store's ``use_event_loop()`` block, on each loop ``run`` makes.
    """

    timeout_seconds: float = 30.0
    race_contenders: int = 16
    use_event_loop: bool = False
    _loop_store: IdempotencyStore | None = None

    @pytest.fixture
    def store(self) -> IdempotencyStore:
        """The store under test, without records under the ``contract`` keys. Override it (a generator is fine)."""
        raise NotImplementedError(f"{type(self).__name__} must override the `store` fixture")

    @pytest.fixture
    def racing_store(self, store: IdempotencyStore) -> IdempotencyStore:
        """The store the threaded races use: ``store`` itself unless overridden.

        Override it to serialise calls to a test double that is not atomic under threads (see ``SerialisedCalls``),
        never for a real server: there, the race is the point.
        """
        return store

    @pytest.fixture(autouse=True)
    def _each_loop_of(self, store: IdempotencyStore) -> None:
        """With ``use_event_loop``: ``run`` enters ``store.use_event_loop()`` on each loop it makes."""
        self._loop_store = store if self.use_event_loop else None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on a new event loop, bounded by ``timeout_seconds`` (see ``use_event_loop``)."""
        store = self._loop_store
        if store is None:
            return asyncio.run(asyncio.wait_for(coroutine, self.timeout_seconds))

        async def on_its_loop() -> T:
            async with store.use_event_loop():
                return await coroutine

        return asyncio.run(asyncio.wait_for(on_its_loop(), self.timeout_seconds))

    def race(self, contend: Callable[[str], T]) -> dict[str, T]:
        """Run ``contend(owner)`` on ``race_contenders`` threads released at once; their outcomes by owner."""
        contenders = self.race_contenders
        start = threading.Barrier(contenders)
        outcomes: dict[str, T] = {}
        errors: list[BaseException] = []
        mutex = threading.Lock()

        def contender(owner: str) -> None:
            try:
                start.wait(self.timeout_seconds)
                outcome = contend(owner)
                with mutex:
                    outcomes[owner] = outcome
            except BaseException as e:  # reported below, on the test's thread
                errors.append(e)

        threads = [threading.Thread(target=contender, args=(f"owner-{i}",)) for i in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout_seconds * 2)
        assert not errors, errors
        assert len(outcomes) == contenders
        return outcomes

    # claim and get

    def test_first_claim_wins_and_others_see_it(self, store: IdempotencyStore) -> None:
        """The first claim stores the record; a second owner's claim gets the stored record instead; get reads it."""

        async def scenario() -> None:
            now = time.time()
            assert await store.get("contract#k") is None
            first = _claim("contract#k", "a", now=now)
            assert await store.claim(first, now) is None
            existing = await store.claim(_claim("contract#k", "b", now=now), now)
            assert existing is not None, "a second owner's claim succeeded while the first claim was held"
            assert existing == first
            assert await store.get("contract#k") == first

        self.run(scenario())

    @pytest.mark.racing
    def test_claim_race_has_one_winner(self, racing_store: IdempotencyStore) -> None:
        """Many threads, each with its own event loop, claim one key at once: exactly one wins."""
        store = racing_store

        def contend(owner: str) -> IdempotencyRecord | None:
            now = time.time()
            return self.run(store.claim(_claim("contract#race", owner, now=now), now))

        outcomes = self.race(contend)
        winners = [owner for owner, outcome in outcomes.items() if outcome is None]
        assert len(winners) == 1, f"{len(winners)} claims won: {sorted(winners)}"
        assert all(o is None or o.owner == winners[0] for o in outcomes.values()), "a loser saw another owner"

    def test_a_blocking_claim_is_the_same_claim(self, store: IdempotencyStore) -> None:
        """Where ``supports_blocking_claims``: ``claim_blocking`` (no event loop) decides exactly as ``claim``."""
        if not store.supports_blocking_claims:
            pytest.skip(f"{type(store).__name__} does not support blocking claims")
        now = time.time()
        assert store.claim_blocking(_claim("contract#k", "a", now=now), now) is None
        existing = store.claim_blocking(_claim("contract#k", "b", now=now), now)
        assert existing is not None and existing.owner == "a" and existing.state is RecordState.IN_PROGRESS
        assert store.claim_blocking(_claim("contract#k", "a", now=now + 1), now + 1) is None  # its own claim
        assert self.run(store.complete(_completed("contract#k", "a", now=now))) is True
        done = store.claim_blocking(_claim("contract#k", "b", now=now), now)
        assert done is not None and done.state is RecordState.COMPLETED and done.payload == b"z"
        # expired: replaced by a blocking claim
        assert store.claim_blocking(_claim("contract#k", "b", now=now + 7200), now + 7200) is None

    def test_keys_of_different_scopes_are_independent(self, store: IdempotencyStore) -> None:
        """Keys that differ only in their scope are different records."""

        async def scenario() -> None:
            now = time.time()
            assert await store.claim(_claim("contract-a#same", "a", now=now), now) is None
            assert await store.claim(_claim("contract-b#same", "b", now=now), now) is None
            got_a, got_b = await store.get("contract-a#same"), await store.get("contract-b#same")
            assert got_a is not None and got_b is not None and (got_a.owner, got_b.owner) == ("a", "b")

        self.run(scenario())

    def test_a_claim_by_its_own_owner_is_its_own(self, store: IdempotencyStore) -> None:
        """A claim retried after its first attempt landed (its response lost) must not wait for itself."""

        async def scenario() -> None:
            now = time.time()
            first = _claim("contract#k", "a", now=now)
            assert await store.claim(first, now) is None
            retried = dataclasses.replace(first, expires_at=first.expires_at + 1)
            assert await store.claim(retried, now + 1) is None
            got = await store.get("contract#k")
            # a retried write carries the very same record; whether the store rewrites it or keeps it is its choice
            assert got in (first, retried)
            # but a completed record is never claimed again, not even by the owner that completed it
            assert await store.complete(_completed("contract#k", "a", now=now)) is True
            existing = await store.claim(_claim("contract#k", "a", now=now), now)
            assert existing is not None and existing.state is RecordState.COMPLETED

        self.run(scenario())

    # no clock decides a claim's liveness; takeover is a compare-and-set on the version

    def test_no_clock_frees_another_owners_claim(self, store: IdempotencyStore) -> None:
        """However far ahead the caller's clock, and however short the lease, a claim blocks other owners' claims."""

        async def scenario() -> None:
            now = time.time()
            first = _claim("contract#k", "a", now=now, lease=1.0)
            assert await store.claim(first, now) is None
            for ahead in (2.0, 600.0, 30 * 86400.0):
                existing = await store.claim(_claim("contract#k", "b", now=now + ahead), now + ahead)
                assert existing == first, f"a claim {ahead}s ahead replaced a running claim"
            # a yielded claim too: only a takeover replaces it
            assert await store.renew("contract#k", "a", version=new_version(), lease_seconds=0, expires_at=now + 60)
            existing = await store.claim(_claim("contract#k", "b", now=now), now)
            assert existing is not None and existing.owner == "a" and existing.yielded

        self.run(scenario())

    def test_take_over_replaces_exactly_the_judged_version(self, store: IdempotencyStore) -> None:
        """``take_over`` writes only over the version the caller judged: not a newer one, not an empty key."""

        async def scenario() -> None:
            now = time.time()
            judged = _claim("contract#k", "crashed", now=now)
            await store.claim(judged, now)
            # the owner renewed after the caller's read: the caller judged a record that is no longer there
            assert await store.renew(
                "contract#k", "crashed", version=new_version(), lease_seconds=60, expires_at=now + 600
            )
            assert await store.take_over(_claim("contract#k", "late", now=now), judged.version) is False
            current = await store.get("contract#k")
            assert current is not None and current.owner == "crashed"
            # the version now stored: taken over, and the old owner is fenced off everywhere
            new = _claim("contract#k", "new", now=now)
            assert await store.take_over(new, current.version) is True
            assert await store.get("contract#k") == new
            assert await store.complete(_completed("contract#k", "crashed", now=now)) is False
            assert await store.release("contract#k", "crashed") is False
            renewed = await store.renew(
                "contract#k", "crashed", version=new_version(), lease_seconds=60, expires_at=now + 600
            )
            assert renewed is False
            assert await store.get("contract#k") == new
            # the new owner released it: a stale judgement of any earlier version lands nowhere
            assert await store.release("contract#k", "new") is True
            assert await store.take_over(_claim("contract#k", "stale", now=now), new.version) is False
            assert await store.take_over(_claim("contract#k", "stale", now=now), current.version) is False
            assert await store.get("contract#k") is None

        self.run(scenario())

    def test_take_over_of_a_yielded_or_completed_record(self, store: IdempotencyStore) -> None:
        """A yielded record keeps its checkpoint for the next holder, who takes it over by its version."""

        async def scenario() -> None:
            now = time.time()
            await store.claim(_claim("contract#k", "a", now=now, checkpoint="turn-1"), now)
            version = new_version()
            assert await store.renew("contract#k", "a", version=version, lease_seconds=0, expires_at=now + 60)
            yielded = await store.get("contract#k")
            assert yielded is not None and yielded.yielded and yielded.checkpoint == "turn-1"
            assert yielded.version == version
            assert await store.take_over(_claim("contract#k", "b", now=now), version) is True
            got = await store.get("contract#k")
            assert got is not None and got.owner == "b" and not got.yielded and got.checkpoint is None

        self.run(scenario())

    @pytest.mark.racing
    def test_take_over_race_has_one_winner(self, racing_store: IdempotencyStore) -> None:
        """Many threads take over one judged version at once: exactly one replaces it."""
        store = racing_store
        now = time.time()
        judged = _claim("contract#race", "crashed", now=now)
        assert self.run(store.claim(judged, now)) is None

        def contend(owner: str) -> bool:
            return self.run(store.take_over(_claim("contract#race", owner, now=time.time()), judged.version))

        outcomes = self.race(contend)
        winners = [owner for owner, won in outcomes.items() if won]
        assert len(winners) == 1, f"{len(winners)} takeovers won: {sorted(winners)}"
        got = self.run(store.get("contract#race"))
        assert got is not None and got.owner == winners[0]

    # expiry

    def test_expired_completed_records_are_replaced(self, store: IdempotencyStore) -> None:
        """A ``COMPLETED`` record past its ``expires_at`` no longer blocks claims; before it, it does."""

        async def scenario() -> None:
            now = time.time()
            await store.claim(_claim("contract#done", "a", now=now), now)
            assert await store.complete(_completed("contract#done", "a", now=now, ttl=10)) is True
            existing = await store.claim(_claim("contract#done", "b", now=now + 9), now + 9)
            assert existing is not None and existing.state is RecordState.COMPLETED and existing.payload == b"z"
            assert await store.claim(_claim("contract#done", "b", now=now + 10), now + 10) is None
            got = await store.get("contract#done")
            assert got is not None and got.owner == "b"

        self.run(scenario())

    def test_live_completed_record_blocks_claims(self, store: IdempotencyStore) -> None:
        """A completed record blocks claims until it expires; its stored result comes back with the failed claim."""

        async def scenario() -> None:
            now = time.time()
            await store.claim(_claim("contract#k", "a", now=now, lease=1), now)
            await store.complete(_completed("contract#k", "a", now=now))
            existing = await store.claim(_claim("contract#k", "b", now=now + 600), now + 600)
            assert existing is not None and existing.state is RecordState.COMPLETED and existing.payload == b"z"

        self.run(scenario())

    # complete and release

    def test_complete_and_release_are_fenced_on_the_owner(self, store: IdempotencyStore) -> None:
        """Only the owner of an ``IN_PROGRESS`` record completes or releases it, once."""

        async def scenario() -> None:
            now = time.time()
            assert await store.complete(_completed("contract#missing", "a", now=now)) is False
            assert await store.release("contract#missing", "a") is False
            assert await store.get("contract#missing") is None
            await store.claim(_claim("contract#k", "a", now=now), now)
            assert await store.complete(_completed("contract#k", "intruder", now=now)) is False
            assert await store.release("contract#k", "intruder") is False
            got = await store.get("contract#k")
            assert got is not None and got.owner == "a" and got.state is RecordState.IN_PROGRESS
            assert await store.complete(_completed("contract#k", "a", now=now, payload=b"zdata")) is True
            done = await store.get("contract#k")
            assert done is not None and done.state is RecordState.COMPLETED and done.payload == b"zdata"
            # a completed record is no longer releasable or completable, not even by its owner
            assert await store.release("contract#k", "a") is False
            assert await store.complete(_completed("contract#k", "a", now=now)) is False

        self.run(scenario())

    def test_release_lets_the_next_claim_run(self, store: IdempotencyStore) -> None:
        """A released claim is gone: the next claim runs."""

        async def scenario() -> None:
            now = time.time()
            await store.claim(_claim("contract#k", "a", now=now), now)
            assert await store.release("contract#k", "a") is True
            assert await store.get("contract#k") is None
            assert await store.claim(_claim("contract#k", "b", now=now), now) is None

        self.run(scenario())

    # renew

    def test_renew_sets_version_lease_and_expiry(self, store: IdempotencyStore) -> None:
        """``renew`` stores the new version, lease and expiry, and leaves owner, state and fingerprint alone."""

        async def scenario() -> None:
            now = time.time()
            first = _claim("contract#k", "a", now=now, lease=10, ttl=100)
            await store.claim(first, now)
            version = new_version()
            assert await store.renew("contract#k", "a", version=version, lease_seconds=7.5, expires_at=now + 500.25)
            got = await store.get("contract#k")
            assert got == dataclasses.replace(first, version=version, lease_seconds=7.5, expires_at=now + 500.25)

        self.run(scenario())

    def test_renew_stores_the_checkpoint_and_none_keeps_it(self, store: IdempotencyStore) -> None:
        """``renew`` stores a given checkpoint (the empty string too); None keeps the stored one."""

        async def scenario() -> None:
            now = time.time()

            async def renew(checkpoint: str | None = None) -> IdempotencyRecord | None:
                renewed = await store.renew(
                    "contract#k",
                    "a",
                    version=new_version(),
                    lease_seconds=60,
                    expires_at=now + 90,
                    checkpoint=checkpoint,
                )
                assert renewed is True
                return await store.get("contract#k")

            await store.claim(_claim("contract#k", "a", now=now), now)
            got = await renew("messages=3")
            assert got is not None and got.checkpoint == "messages=3"
            got = await renew()
            assert got is not None and got.checkpoint == "messages=3"
            got = await renew("")
            assert got is not None and got.checkpoint == ""

        self.run(scenario())

    def test_renew_is_fenced_on_owner_and_in_progress(self, store: IdempotencyStore) -> None:
        """``renew`` is fenced like ``complete``: not after a takeover, a completion, or a release."""

        async def scenario() -> None:
            now = time.time()

            async def renew(key: str, owner: str, checkpoint: str | None = None) -> bool:
                version = new_version()
                return await store.renew(
                    key, owner, version=version, lease_seconds=60, expires_at=now + 600, checkpoint=checkpoint
                )

            assert await renew("contract#missing", "a") is False
            first = _claim("contract#k", "a", now=now)
            await store.claim(first, now)
            assert await renew("contract#k", "intruder") is False
            assert await store.get("contract#k") == first
            taken = _claim("contract#k", "b", now=now)
            assert await store.take_over(taken, first.version) is True
            assert await renew("contract#k", "a", checkpoint="stale") is False
            assert await store.get("contract#k") == taken
            assert await renew("contract#k", "b") is True
            # completed: nothing to renew, and the completed record is untouched
            done = _completed("contract#k", "b", now=now)
            assert await store.complete(done) is True
            assert await renew("contract#k", "b", checkpoint="late") is False
            assert await store.get("contract#k") == done
            # released: gone
            await store.claim(_claim("contract#other", "c", now=now), now)
            assert await store.release("contract#other", "c") is True
            assert await renew("contract#other", "c") is False
            assert await store.get("contract#other") is None

        self.run(scenario())

    # what is stored

    def test_records_round_trip_exactly(self, store: IdempotencyStore) -> None:
        """Every field comes back exactly: times to the last bit, bytes, empty payloads, None as None."""

        async def scenario() -> None:
            now = time.time()
            claim = IdempotencyRecord(
                "contract#k", RecordState.IN_PROGRESS, "a", new_version(), 60.125, now + 3600.5, None, None, "cp-1"
            )
            assert await store.claim(claim, now) is None
            assert await store.get("contract#k") == claim
            payload = bytes(range(256)) * 4
            done = IdempotencyRecord(
                "contract#k", RecordState.COMPLETED, "a", new_version(), 0.0, now + 3600.125, "f" * 64, payload
            )
            assert await store.complete(done) is True
            assert await store.get("contract#k") == done
            empty = IdempotencyRecord(
                "contract#empty", RecordState.COMPLETED, "a", new_version(), 0.0, now + 60, None, b""
            )
            await store.claim(_claim("contract#empty", "a", now=now, fingerprint=None), now)
            assert await store.complete(empty) is True
            assert await store.get("contract#empty") == empty

        self.run(scenario())

    def test_a_result_of_max_result_bytes_is_stored(self, store: IdempotencyStore) -> None:
        """A result as large as the store's ``max_result_bytes`` (at most 8 MiB here) is stored and read back."""
        limit = store.max_result_bytes
        assert limit is None or limit > 0
        size = min(limit or 1 << 20, 8 << 20)

        async def scenario() -> None:
            now = time.time()
            payload = bytes(i % 251 for i in range(size))  # not compressible, as a zlib stream would be
            await store.claim(_claim("contract#big", "a", now=now), now)
            assert await store.complete(_completed("contract#big", "a", now=now, payload=payload)) is True
            got = await store.get("contract#big")
            assert got is not None and got.payload == payload

        self.run(scenario())

    # the journal (optional: ``supports_journal``)

    def _journal_store(self, store: IdempotencyStore) -> IdempotencyStore:
        if not store.supports_journal:
            pytest.skip(f"{type(store).__name__} does not support journals")
        return store

    def test_journal_appends_are_fenced_on_the_owner_and_read_back_in_order(self, store: IdempotencyStore) -> None:
        """Only the owner of the ``IN_PROGRESS`` record appends; entries come back in order, byte for byte."""
        store = self._journal_store(store)

        async def scenario() -> None:
            now = time.time()
            assert await store.journal("contract#k") == []
            assert await store.append("contract#k", "a", b"no claim") is False
            await store.claim(_claim("contract#k", "a", now=now), now)
            entries = [b"\x00step-0", bytes(range(256)), b"", "\u00e9t\u00e9".encode()]
            for entry in entries:
                assert await store.append("contract#k", "a", entry) is True
            assert await store.append("contract#k", "intruder", b"x") is False
            assert await store.journal("contract#k") == entries
            assert await store.journal("contract#other") == []

        self.run(scenario())

    def test_a_takeover_keeps_the_journal_and_fences_the_old_owner(self, store: IdempotencyStore) -> None:
        """The new owner resumes from the journal; the old owner can neither append to it nor truncate it."""
        store = self._journal_store(store)

        async def scenario() -> None:
            now = time.time()
            first = _claim("contract#k", "crashed", now=now)
            await store.claim(first, now)
            assert await store.append("contract#k", "crashed", b"model-0") is True
            assert await store.take_over(_claim("contract#k", "new", now=now), first.version) is True
            assert await store.journal("contract#k") == [b"model-0"]
            assert await store.append("contract#k", "crashed", b"late") is False
            assert await store.truncate("contract#k", "crashed", 0) is False
            assert await store.append("contract#k", "new", b"tool-0") is True
            renewed = await store.renew(
                "contract#k", "new", version=new_version(), lease_seconds=60, expires_at=now + 600
            )
            assert renewed is True
            assert await store.journal("contract#k") == [b"model-0", b"tool-0"]

        self.run(scenario())

    def test_truncate_keeps_a_prefix(self, store: IdempotencyStore) -> None:
        """``truncate`` keeps the first entries (all of them when it asks for more), fenced on the owner."""
        store = self._journal_store(store)

        async def scenario() -> None:
            now = time.time()
            await store.claim(_claim("contract#k", "a", now=now), now)
            for entry in (b"0", b"1", b"2", b"3"):
                await store.append("contract#k", "a", entry)
            assert await store.truncate("contract#k", "a", 10) is True
            assert await store.journal("contract#k") == [b"0", b"1", b"2", b"3"]
            assert await store.truncate("contract#k", "a", 2) is True
            assert await store.journal("contract#k") == [b"0", b"1"]
            assert await store.append("contract#k", "a", b"2'") is True
            assert await store.journal("contract#k") == [b"0", b"1", b"2'"]
            assert await store.truncate("contract#k", "a", 0) is True
            assert await store.journal("contract#k") == []
            assert await store.truncate("contract#missing", "a", 0) is False

        self.run(scenario())

    @pytest.mark.parametrize("end", ["complete", "release", "expiry and a fresh claim"])
    def test_the_journal_ends_with_its_claim(self, store: IdempotencyStore, end: str) -> None:
        """A completed, released or expired claim leaves no journal behind: a fresh claim starts an empty one."""
        store = self._journal_store(store)

        async def scenario() -> None:
            now = time.time()
            await store.claim(_claim("contract#k", "a", now=now), now)
            assert await store.append("contract#k", "a", b"step") is True
            if end == "complete":
                assert await store.complete(_completed("contract#k", "a", now=now, ttl=10)) is True
                assert await store.journal("contract#k") == []
                later = now + 20
            elif end == "release":
                assert await store.release("contract#k", "a") is True
                later = now
            else:
                assert await store.complete(_completed("contract#k", "a", now=now, ttl=10)) is True
                later = now + 20
            assert await store.claim(_claim("contract#k", "b", now=later), later) is None
            assert await store.journal("contract#k") == []
            assert await store.append("contract#k", "b", b"fresh") is True
            assert await store.journal("contract#k") == [b"fresh"]

        self.run(scenario())

    def test_a_journal_entry_of_max_journal_entry_bytes_is_stored(self, store: IdempotencyStore) -> None:
        """An entry as large as ``max_journal_entry_bytes`` (at most 4 MiB here) is stored and read back."""
        store = self._journal_store(store)
        limit = store.max_journal_entry_bytes
        size = min(limit or 1 << 20, 4 << 20)

        async def scenario() -> None:
            now = time.time()
            entry = bytes(i % 253 for i in range(size))
            await store.claim(_claim("contract#big", "a", now=now), now)
            assert await store.append("contract#big", "a", entry) is True
            assert await store.journal("contract#big") == [entry]

        self.run(scenario())

    # cancels (optional: ``supports_cancel``)

    def _cancel_store(self, store: IdempotencyStore) -> IdempotencyStore:
        if not store.supports_cancel:
            pytest.skip(f"{type(store).__name__} does not support cancels")
        return store

    def test_a_cancel_marks_a_running_claim_and_fences_its_owner(self, store: IdempotencyStore) -> None:
        """A marked claim keeps its version (a mark is no heartbeat) and fences its owner.

        The owner can no longer renew, journal or store a result, but it can leave a ``CANCELLED`` tombstone, which
        frees the key for a fresh claim at once.
        """
        store = self._cancel_store(store)

        async def scenario() -> None:
            now = time.time()
            first = _claim("contract#k", "a", now=now)
            await store.claim(first, now)
            if store.supports_journal:
                assert await store.append("contract#k", "a", b"step-0") is True
            marked = await store.cancel("contract#k")
            assert marked == dataclasses.replace(first, cancelled=True)
            assert await store.cancel("contract#k") == marked  # marking twice is marking once
            assert await store.get("contract#k") == marked
            renewed = await store.renew("contract#k", "a", version=new_version(), lease_seconds=60, expires_at=now + 60)
            assert renewed is False
            if store.supports_journal:
                assert await store.append("contract#k", "a", b"step") is False
                assert await store.truncate("contract#k", "a", 0) is False
            assert await store.complete(_completed("contract#k", "a", now=now)) is False
            # another owner's claim is still blocked: only its owner's tombstone (or a takeover) frees the key
            existing = await store.claim(_claim("contract#k", "b", now=now), now)
            assert existing == marked
            tombstone = IdempotencyRecord("contract#k", RecordState.CANCELLED, "a", new_version(), 0.0, now + 60, "fp")
            assert await store.complete(tombstone) is True
            assert await store.get("contract#k") == tombstone
            assert await store.claim(_claim("contract#k", "b", now=now), now) is None
            if store.supports_journal:
                assert await store.journal("contract#k") == []

        self.run(scenario())

    def test_a_cancel_leaves_finished_and_absent_keys_alone(self, store: IdempotencyStore) -> None:
        """A completed record stays completed (its answer stands); an absent key stays absent."""
        store = self._cancel_store(store)

        async def scenario() -> None:
            now = time.time()
            assert await store.cancel("contract#missing") is None
            assert await store.get("contract#missing") is None
            await store.claim(_claim("contract#k", "a", now=now), now)
            done = _completed("contract#k", "a", now=now)
            assert await store.complete(done) is True
            assert await store.cancel("contract#k") == done
            assert await store.get("contract#k") == done

        self.run(scenario())

    def test_a_marked_claim_is_released_or_taken_over_as_any_other(self, store: IdempotencyStore) -> None:
        """Its owner may release it; a waiter that judged it abandoned takes it over by its version."""
        store = self._cancel_store(store)

        async def scenario() -> None:
            now = time.time()
            first = _claim("contract#k", "a", now=now)
            await store.claim(first, now)
            await store.cancel("contract#k")
            assert await store.take_over(_claim("contract#k", "b", now=now), first.version) is True
            got = await store.get("contract#k")
            assert got is not None and got.owner == "b" and not got.cancelled
            await store.cancel("contract#k")
            assert await store.release("contract#k", "b") is True
            assert await store.get("contract#k") is None

        self.run(scenario())

    def test_an_owners_resent_claim_keeps_a_cancel(self, store: IdempotencyStore) -> None:
        """A claim resent by its owner after its reply was lost never erases a cancel that landed in between."""
        store = self._cancel_store(store)

        async def scenario() -> None:
            now = time.time()
            first = _claim("contract#k", "a", now=now)
            await store.claim(first, now)
            await store.cancel("contract#k")
            assert await store.claim(first, now) is None  # its own claim
            got = await store.get("contract#k")
            assert got is not None and got.owner == "a" and got.cancelled

        self.run(scenario())
