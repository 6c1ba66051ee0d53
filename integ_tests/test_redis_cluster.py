"""RedisIdempotencyStore on a real Redis Cluster (three redis-server primaries on 127.0.0.1, started by this module).

The store contract, journal and cancels included, through redis-py's cluster client; the keys of many invocations
spread over the slots and the nodes while each invocation's record and journal share one slot; a slot migrating under
a running claim (ASK, then MOVED) carries the journal with the record, and a cancel follows it there. Negative
controls: a journal key without the record's hash tag, and a plain (non-cluster) client, both fail loudly instead of
splitting an invocation over two nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import redis
from _redis_cluster import CLUSTER_SLOTS, ClusterNode, LocalRedisCluster, running_redis_cluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from strands_py.idempotency import IdempotencyRecord, IdempotencyStore, IdempotencyStoreError, RecordState
from strands_py.idempotency.record import new_version
from strands_py.idempotency.redis import RedisIdempotencyStore
from strands_py.testing.store_contract import StoreContract

PREFIX = "strands-py:idempotency:"
INVOCATIONS = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    """Three primaries for the module's tests; every node stopped after it, also when a test fails."""
    with running_redis_cluster(3) as cluster:
        yield cluster


@pytest.fixture
def url(cluster: LocalRedisCluster) -> Iterator[str]:
    """A node's URL, every node emptied before the test."""
    client = RedisCluster.from_url(cluster.url)
    client.flushall()  # sent to every primary
    client.close()
    yield cluster.url


def _claim(key: str, owner: str, now: float) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.IN_PROGRESS, owner, new_version(), 60.0, now + 3660.0, "fp")


def _completed(key: str, owner: str, now: float) -> IdempotencyRecord:
    return IdempotencyRecord(key, RecordState.COMPLETED, owner, new_version(), 0.0, now + 3600.0, "fp", b"result")


class TestRedisClusterContract(StoreContract):
    """The whole store contract, journal included, on the cluster (``from_url(..., cluster=True)``)."""

    @pytest.fixture
    def store(self, url: str) -> Iterator[IdempotencyStore]:
        with RedisIdempotencyStore.from_url(url, cluster=True) as store:
            assert isinstance(store._client, RedisCluster)
            yield store


class TestRedisClusterContractOnItsLoop(TestRedisClusterContract):
    """The same, each call on its loop's asyncio cluster client (``redis.asyncio.cluster.RedisCluster``)."""

    use_event_loop = True


def test_a_cluster_option_the_asyncio_client_refuses_keeps_the_threads(url: str) -> None:
    """``retry_on_timeout`` is the sync cluster client's, not the asyncio one's: the store serves on its threads, and a
    server's lifespan still starts (entering ``use_event_loop`` made the asyncio client, which refused it)."""

    async def served(store: RedisIdempotencyStore) -> IdempotencyRecord | None:
        async with store.use_event_loop():
            now = time.time()
            assert await store.claim(_claim("s#k", "a", now), now) is None
            return await store.get("s#k")

    with RedisIdempotencyStore.from_url(url, cluster=True, retry_on_timeout=True) as store:
        found = asyncio.run(served(store))
    assert found is not None and found.owner == "a"


def _keys_by_node(cluster: LocalRedisCluster) -> dict[int, set[bytes]]:
    """Every node's keys, read from the node itself."""
    found = {}
    for node in cluster.nodes:
        with node.client() as client:
            found[node.port] = set(client.keys("*"))
    return found


def test_invocations_spread_over_the_slots_and_each_keeps_its_record_and_journal_in_one(
    cluster: LocalRedisCluster, url: str
) -> None:
    """300 invocations (half of a tenant whose name holds braces), each claimed with a journal entry.

    Read back from each node on its own: every invocation's record and journal sit on one node, in one slot (the
    server's CLUSTER KEYSLOT says so), and the invocations spread over all three nodes and ~300 distinct slots.
    """
    scopes = ["tenant-a", "{acme}"]
    keys = [f"{scopes[i % 2]}#{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(INVOCATIONS)]
    now = time.time()

    async def write_all(store: RedisIdempotencyStore) -> None:
        for key in keys:
            assert await store.claim(_claim(key, "owner", now), now) is None
            assert await store.append(key, "owner", b"step-0") is True
        assert [await store.journal(key) for key in keys[:5]] == [[b"step-0"]] * 5

    slots: Counter[int] = Counter()
    with RedisIdempotencyStore.from_url(url, cluster=True) as store:
        asyncio.run(write_all(store))
        on_node = _keys_by_node(cluster)
        with cluster.nodes[0].client() as any_node:
            for key in keys:
                record, journal = (k.encode() for k in store.redis_keys(key))
                [port] = [p for p, held in on_node.items() if record in held]
                assert journal in on_node[port], f"{key}: journal away from its record"
                slot = any_node.execute_command("CLUSTER KEYSLOT", record)
                assert any_node.execute_command("CLUSTER KEYSLOT", journal) == slot
                slots[slot] += 1
    per_node = {port: len(held) // 2 for port, held in on_node.items()}
    print(f"{INVOCATIONS} invocations over {len(slots)} slots; per node: {sorted(per_node.values())}")
    assert sum(per_node.values()) == INVOCATIONS
    # Each node owns a third of the slots: a fair spread gives each ~100; below 50 would be a skew, not chance.
    assert all(count >= 50 for count in per_node.values()), per_node
    # 300 draws from 16,384 slots give ~297 distinct ones; a tag cut short by the braces of "{acme}" would put half
    # the invocations in one slot.
    assert len(slots) >= 280 and max(slots.values()) <= 3, slots.most_common(3)


class _UntaggedJournal(RedisIdempotencyStore):
    """Negative control: the journal at key_prefix + key + ":journal", the record at key_prefix + key (no hash tag)."""

    def redis_keys(self, key: str) -> tuple[str, str]:
        return self.key_prefix + key, self.key_prefix + key + ":journal"


@pytest.fixture(
    params=["tagged", pytest.param("untagged", marks=pytest.mark.xfail(strict=True, raises=AssertionError))]
)
def layout(request: pytest.FixtureRequest, url: str) -> Iterator[RedisIdempotencyStore]:
    cls = RedisIdempotencyStore if request.param == "tagged" else _UntaggedJournal
    store = cls(RedisCluster.from_url(url), close_client=True)
    yield store
    store.close()


def test_a_journal_without_the_records_hash_tag_cannot_be_used_on_a_cluster(layout: RedisIdempotencyStore) -> None:
    """Untagged (xfail), most keys' record and journal fall in different slots: every script fails with CROSSSLOT."""
    failed = 0
    now = time.time()

    async def scenario() -> None:
        nonlocal failed
        for i in range(20):
            key = f"s#{i}"
            try:
                await layout.claim(_claim(key, "a", now), now)
                await layout.append(key, "a", b"step")
            except IdempotencyStoreError as e:
                assert "same key slot" in str(e) or "CROSSSLOT" in str(e), e
                failed += 1

    asyncio.run(scenario())
    assert failed == 0, f"{failed} of 20 invocations could not be claimed or journaled"


@pytest.mark.parametrize(
    "kind", ["cluster", pytest.param("plain", marks=pytest.mark.xfail(strict=True, raises=IdempotencyStoreError))]
)
def test_a_plain_client_on_a_cluster_fails_loudly(url: str, kind: str) -> None:
    """A ``redis.Redis`` on one node gets MOVED for the slots of the others: an error, never a record split or lost.

    The store works only through the cluster client (xfail: the plain one).
    """
    now = time.time()
    client: Any = RedisCluster.from_url(url) if kind == "cluster" else redis.Redis.from_url(url)
    with RedisIdempotencyStore(client, close_client=True) as store:
        for i in range(20):  # 20 keys: with three nodes, the odds that all fall on the URL's node are (1/3)^20
            try:
                assert asyncio.run(store.claim(_claim(f"s#{i}", "a", now), now)) is None
            except IdempotencyStoreError as e:
                assert "MovedError" in str(e) and "cluster=True" in str(e), e
                raise


@pytest.mark.parametrize("finish", [False, True], ids=["ask-mid-migration", "moved-after-migration"])
def test_a_slot_migrating_under_a_running_claim_carries_its_journal(
    cluster: LocalRedisCluster, url: str, finish: bool
) -> None:
    """An operator reshards the slot of a running claim: its record and journal move together (MIGRATE of both).

    Mid-migration the source answers ASK, after it MOVED; the store follows either, and the owner goes on appending,
    reading, renewing and completing: nothing is lost, nothing is duplicated, and the old owner stays fenced off.
    """
    now = time.time()
    key = "tenant#migrating"
    store = RedisIdempotencyStore.from_url(url, cluster=True)
    record_key, journal_key = store.redis_keys(key)
    slot = key_slot(record_key.encode())
    source = cluster.node_owning(slot)
    target = next(node for node in cluster.nodes if node is not source)

    def keys_in_slot(node: ClusterNode) -> int:
        with node.client() as client:  # an admin command: answered by the node itself, never redirected
            return int(client.execute_command("CLUSTER COUNTKEYSINSLOT", slot))

    async def scenario() -> None:
        first = _claim(key, "crashed", now)
        assert await store.claim(first, now) is None
        assert await store.append(key, "crashed", b"model-0") is True
        assert await store.take_over(_claim(key, "owner", now), first.version) is True
        cluster.move_slot(slot, target, finish=finish)
        assert (keys_in_slot(source), keys_in_slot(target)) == (0, 2)  # both keys moved, in one MIGRATE
        assert await store.journal(key) == [b"model-0"]
        assert await store.append(key, "owner", b"tool-0") is True
        assert await store.append(key, "crashed", b"late") is False
        renewed = await store.renew(key, "owner", version=new_version(), lease_seconds=60, expires_at=now + 600)
        assert renewed is True
        assert await store.journal(key) == [b"model-0", b"tool-0"]
        if not finish:
            cluster.assign_slot(slot, target)
        assert await store.complete(_completed(key, "owner", now)) is True
        assert await store.journal(key) == []
        got = await store.get(key)
        assert got is not None and got.payload == b"result"
        assert keys_in_slot(target) == 1  # the completed record; its journal is gone

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        if cluster.node_owning(slot) is source:
            cluster.assign_slot(slot, source)  # ends a migration the test left half done: the slot stays home
        else:
            cluster.move_slot(slot, source)  # back where it was, for the next tests


@pytest.mark.parametrize("finish", [False, True], ids=["ask-mid-migration", "moved-after-migration"])
def test_a_cancel_reaches_a_claim_whose_slot_is_migrating(cluster: LocalRedisCluster, url: str, finish: bool) -> None:
    """The cancel script, unknown to every node (SCRIPT FLUSH), follows ASK or MOVED to the claim and marks it there.

    The owner, fenced off from renewing and journaling, leaves its tombstone on the slot's new node (the journal goes
    with it), and a fresh claim replaces the tombstone at once.
    """
    now = time.time()
    key = "tenant#cancelled-while-migrating"
    store = RedisIdempotencyStore.from_url(url, cluster=True)
    record_key, _ = store.redis_keys(key)
    slot = key_slot(record_key.encode())
    source = cluster.node_owning(slot)
    target = next(node for node in cluster.nodes if node is not source)

    async def scenario() -> None:
        running = _claim(key, "owner", now)
        assert await store.claim(running, now) is None
        assert await store.append(key, "owner", b"model-0") is True
        for node in cluster.nodes:
            with node.client() as client:
                client.script_flush()
        cluster.move_slot(slot, target, finish=finish)
        marked = await store.cancel(key)
        assert marked is not None and marked.cancelled and marked.version == running.version
        renewed = await store.renew(key, "owner", version=new_version(), lease_seconds=60, expires_at=now + 600)
        assert renewed is False
        assert await store.append(key, "owner", b"tool-0") is False
        assert await store.journal(key) == [b"model-0"]
        if not finish:
            cluster.assign_slot(slot, target)
        with target.client() as client:  # the mark landed on the node that now holds the keys
            assert client.hget(record_key, "cancelled") == b"1"
        assert await store.complete(_completed(key, "owner", now)) is False  # no result after a cancel
        tombstone = IdempotencyRecord(key, RecordState.CANCELLED, "owner", new_version(), 0.0, now + 600.0, "fp")
        assert await store.complete(tombstone) is True
        assert await store.journal(key) == []
        fresh = _claim(key, "retry", now)
        assert await store.claim(fresh, now) is None
        assert await store.get(key) == fresh

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        if cluster.node_owning(slot) is source:
            cluster.assign_slot(slot, source)  # ends a migration the test left half done: the slot stays home
        else:
            cluster.move_slot(slot, source)  # back where it was, for the next tests


def test_every_slot_is_served(cluster: LocalRedisCluster) -> None:
    """The fixture's cluster covers every slot on three nodes (what the tests above assume)."""
    owners = {cluster.node_owning(slot).port for slot in (0, CLUSTER_SLOTS // 2, CLUSTER_SLOTS - 1)}
    assert len(owners) == 3
    assert all(node.cluster_info()["cluster_state"] == "ok" for node in cluster.nodes)


def _refused(port: int) -> bool:
    """Whether nothing listens on ``port`` any more (a plain TCP connect: no client retries to wait for)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_cluster_helper_stops_every_node_it_started() -> None:
    with running_redis_cluster(3) as cluster:
        ports = [node.port for node in cluster.nodes]
        assert not any(_refused(port) for port in ports)
    assert all(_refused(port) for port in ports)


def test_the_cluster_helper_stops_its_nodes_when_the_join_fails() -> None:
    """``redis-cli --cluster create`` failing (here: ``false`` in its place) still stops the nodes started before."""
    started: list[int] = []
    real_start = ClusterNode.start

    def start(node: ClusterNode) -> None:
        real_start(node)
        started.append(node.port)

    with (
        mock.patch.object(ClusterNode, "start", start),
        mock.patch("_redis_cluster.redis_cli_binary", return_value=shutil.which("false")),
        pytest.raises(RuntimeError, match="cluster create failed"),
        running_redis_cluster(3),
    ):
        pass
    assert len(started) == 3 and all(_refused(port) for port in started)
