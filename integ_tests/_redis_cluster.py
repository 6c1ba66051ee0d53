"""A real Redis Cluster on 127.0.0.1 for integration tests: its nodes started by the test that needs it, stopped by it.

Three primaries (no replicas), each a ``redis-server --cluster-enabled yes`` without persistence in a directory of its
own, on free ports (its cluster bus on a second free port, ``--cluster-port``, rather than the default port + 10000,
which may be taken or past 65535); joined by ``redis-cli --cluster create``; ready once every node's ``CLUSTER INFO``
says ``cluster_state:ok`` with every slot assigned and every node known.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from _servers import PORT_ATTEMPTS, READY_TIMEOUT, STOP_TIMEOUT, free_port, redis_server_binary

CLUSTER_SLOTS = 16384
JOIN_TIMEOUT = 60.0  # redis-cli --cluster create, and the nodes agreeing on the slot map afterwards
POLL = 0.05  # between two readings of CLUSTER INFO while the nodes agree


def redis_cli_binary() -> str:
    """``redis-cli`` (Debian's redis-tools); skips the test where it is missing, fails on CI."""
    binary = shutil.which("redis-cli")
    if binary is None:
        message = "redis-cli is not installed (apt-get install redis-tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


class ClusterNode:
    """One ``redis-server`` in cluster mode on 127.0.0.1."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self.node_id = ""
        self._dir = tempfile.mkdtemp(prefix="strands-py-redis-cluster-")
        self._process: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    def start(self) -> None:
        """Start on free ports (another pair if the first was taken meanwhile)."""
        for _ in range(PORT_ATTEMPTS):
            if self._launch(free_port(), free_port()):
                return
        raise RuntimeError(f"redis-server (cluster mode) did not start: {''.join(self.output[-20:])}")

    def _launch(self, port: int, bus_port: int) -> bool:
        if port == bus_port:
            return False
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", self._dir, "--save", ""]
        args += ["--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        args += ["--cluster-port", str(bus_port), "--cluster-node-timeout", "5000", "--logfile", ""]
        args += ["--daemonize", "no"]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()
        self.output = []

        def drain() -> None:
            # Reads the log to the end (so the pipe never fills), and tells when the node is ready or has exited.
            assert process.stdout is not None
            for line in process.stdout:
                self.output.append(line)
                if "Ready to accept connections" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, name=f"redis-cluster-{port}-log", daemon=True).start()
        if not ready.wait(READY_TIMEOUT) or process.poll() is not None:
            _terminate(process)
            return False
        self._process = process
        self.port = port
        with self.client() as client:
            self.node_id = client.execute_command("CLUSTER MYID").decode()
        return True

    def client(self) -> redis.Redis:
        """A plain client of this node alone (it answers MOVED for keys of slots it does not own)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=READY_TIMEOUT)

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            info = client.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
        return {str(name): str(value) for name, value in info.items()}

    def stop(self) -> None:
        if self._process is not None:
            _terminate(self._process)
            self._process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class LocalRedisCluster:
    """``size`` primaries joined into one cluster, every slot assigned."""

    def __init__(self, size: int = 3) -> None:
        binary = redis_server_binary()
        self.cli = redis_cli_binary()
        self.nodes = [ClusterNode(binary) for _ in range(size)]

    @property
    def url(self) -> str:
        """The URL of one node: a cluster client reads the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> LocalRedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        created = subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=JOIN_TIMEOUT,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        self.wait_until_ok()
        return self

    def wait_until_ok(self) -> None:
        """Wait (bounded) until every node sees the cluster ok: every slot assigned, every node known."""
        deadline = time.monotonic() + JOIN_TIMEOUT
        while True:
            infos = [node.cluster_info() for node in self.nodes]
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
                and info.get("cluster_known_nodes") == str(len(self.nodes))
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become ok within {JOIN_TIMEOUT} s: {infos}")
            time.sleep(POLL)  # polling the nodes' own state, with a deadline: not a sleep standing in for a signal

    def node_owning(self, slot: int) -> ClusterNode:
        """The node that owns ``slot`` (by the first node's view of the slot map)."""
        with self.nodes[0].client() as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"slot {slot} is not assigned")

    def move_slot(self, slot: int, target: ClusterNode, *, finish: bool = True) -> ClusterNode:
        """Migrate ``slot`` with its keys to ``target`` (``CLUSTER SETSLOT`` + ``MIGRATE``); returns the source.

        With ``finish=False`` the slot stays half-migrated (keys moved, the source still ``MIGRATING``, the target
        ``IMPORTING``): the source answers ``ASK`` for it, as during a resharding.
        """
        source = self.node_owning(slot)
        assert source is not target
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target.node_id)
            keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
            if keys:
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        if finish:
            self.assign_slot(slot, target)
        return source

    def assign_slot(self, slot: int, target: ClusterNode) -> None:
        """End a migration: every node records ``target`` as the slot's owner."""
        for node in [target, *(n for n in self.nodes if n is not target)]:
            with node.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", target.node_id)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def _terminate(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


@contextmanager
def running_redis_cluster(size: int = 3) -> Iterator[LocalRedisCluster]:
    """A started cluster of ``size`` primaries, every node stopped (and its directory removed) on exit, whatever
    happens (a node that started is stopped even when a later one, or the join, fails)."""
    cluster = LocalRedisCluster(size)
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()
