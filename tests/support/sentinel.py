"""A Redis Sentinel topology on 127.0.0.1 for tests: 1 primary, N replicas, M sentinels.

Every process is a real redis-server (`--sentinel` for the sentinels) on a free port with its
own config file and directory (Sentinel rewrites both kinds of config on a failover, and a
restarted node comes back with what it was last told), stopped by PID. Timers are short:
`down-after-milliseconds 1000`, `failover-timeout 5000`, `repl-diskless-sync-delay 0`. Redis
6.2 (the bundled server) has no `SENTINEL DEBUG`, so the sentinels keep their 10 s INFO period:
a live old primary is turned into a replica up to ~10 s after a manual failover.

Faults: `kill` (SIGKILL), `freeze`/`thaw` (SIGSTOP/SIGCONT) any node, `start` again (a killed
node comes back from its config file), `failover()` (SENTINEL FAILOVER, waiting until every
sentinel names the new primary); `wait_new_primary` after a kill or freeze, `wait_replica_of`
for a node rejoining. On a busy machine sentinels can
enter TILT mode and fail over late: tests wait on conditions, never on fixed times.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import redis

from devstack.processes import (
    ManagedProcess,
    ProcessServer,
    StopsOnExit,
    free_port,
    wait_until,
)
from devstack.redis import find_redis_server

HOST = "127.0.0.1"
MASTER = "dispatcher"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class Node(ProcessServer):
    """One redis-server (a data node or a sentinel) run from its config file."""

    program = "redis-server"

    def __init__(self, workdir: Path, config: str, *, sentinel: bool = False) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = free_port()
        self.sentinel = sentinel
        self.config_path = workdir / ("sentinel.conf" if sentinel else "redis.conf")
        self._config = f"port {self.port}\nbind {HOST}\ndir {workdir}\n{config}"
        self.frozen = False

    def start(self, timeout: float = 15) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():  # a restart keeps what Sentinel rewrote into it
            self.config_path.write_text(self._config)
        argv = [str(find_redis_server()), str(self.config_path)]
        if self.sentinel:
            argv.append("--sentinel")
        if self._process is not None:
            self._process.stop()
        log = self.workdir / "server.log"
        self._process = ManagedProcess(argv, log, cwd=self.workdir).start()
        wait_until(self._answers, timeout, f"{self.program} on port {self.port}")
        return self

    def client(self, *, timeout: float = 2, decode_responses: bool = True) -> redis.Redis:
        """A direct client of this node alone (the caller closes it)."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=decode_responses,
        )

    def role(self) -> str:
        with self.client() as client:
            return str(client.execute_command("ROLE")[0])

    def freeze(self) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self, timeout: float = 10) -> None:
        if self.frozen and self.alive:
            self.thaw()  # a stopped process would not see SIGTERM
        super().stop(timeout)

    def kill(self) -> None:
        super().kill()
        self.frozen = False

    def _answers(self) -> bool:
        assert self._process is not None
        self._process.check_alive(f"redis-server on port {self.port}")
        try:
            with self.client(timeout=1) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False


class SentinelTopology(StopsOnExit):
    """1 primary, `replicas` replicas and `sentinels` sentinels (quorum: a majority)."""

    def __init__(self, workdir: Path, *, replicas: int = 2, sentinels: int = 3) -> None:
        self.workdir = workdir
        self.master = MASTER
        data = 'save ""\nappendonly no\nrepl-diskless-sync yes\nrepl-diskless-sync-delay 0\n'
        self.nodes = [Node(workdir / "node-0", data)]
        primary = self.nodes[0].port
        self.nodes += [
            Node(workdir / f"node-{n}", data + f"replicaof {HOST} {primary}\n")
            for n in range(1, replicas + 1)
        ]
        quorum = sentinels // 2 + 1
        watch = (
            f"sentinel monitor {MASTER} {HOST} {primary} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
        )
        self.sentinels = [
            Node(workdir / f"sentinel-{n}", watch, sentinel=True) for n in range(sentinels)
        ]

    @property
    def url(self) -> str:
        """REDIS_URL in Celery's sentinel form."""
        return ";".join(f"sentinel://{HOST}:{sentinel.port}" for sentinel in self.sentinels)

    @property
    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url, "REDIS_SENTINEL_MASTER": self.master}

    def start(self, timeout: float = 30) -> Self:
        for node in self.nodes:
            node.start()
        self.wait_replicas_online(len(self.nodes) - 1, timeout, self.nodes[0])
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._sentinels_agree, timeout, "sentinels that know every node and peer")
        return self

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    # --- who is who -------------------------------------------------------------------------

    def node(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def primary_port(self) -> int | None:
        """The primary the first live sentinel names."""
        for sentinel in self.sentinels:
            if sentinel.alive and not sentinel.frozen:
                port = self._named_by(sentinel)
                if port is not None:
                    return port
        return None

    def primary(self) -> Node:
        port = self.primary_port()
        if port is None:
            raise RuntimeError("no sentinel answers")
        return self.node(port)

    def replicas(self) -> list[Node]:
        primary = self.primary()
        return [node for node in self.nodes if node is not primary]

    def online_replicas(self, primary: Node | None = None) -> int:
        """How many replicas the primary (the sentinels' unless given) sees online."""
        with (primary or self.primary()).client() as client:
            info = client.info("replication")
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave") and isinstance(value, dict) and value["state"] == "online"
        )

    def wait_replicas_online(
        self, count: int, timeout: float = 30, primary: Node | None = None
    ) -> None:
        wait_until(
            lambda: self._quietly(lambda: self.online_replicas(primary) >= count),
            timeout,
            f"{count} replica(s) online",
        )

    # --- faults -----------------------------------------------------------------------------

    def failover(self, timeout: float = 30) -> Node:
        """SENTINEL FAILOVER; returns the new primary once every live sentinel names it and it
        says it is one (the old primary may still take writes for a while: see above)."""
        old = self.primary()
        deadline = time.monotonic() + timeout
        while True:  # refused while a previous failover is still settling (INPROG, NOGOODSLAVE)
            try:
                with self.sentinels[0].client() as client:
                    client.execute_command("SENTINEL", "FAILOVER", MASTER)
                break
            except redis.ResponseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        return self.wait_new_primary(old, max(0.0, deadline - time.monotonic()))

    def wait_new_primary(self, old: Node, timeout: float = 30) -> Node:
        """The primary that replaced `old`, once every live sentinel names it and it says it is
        one (after a kill or freeze of `old`, or a failover)."""

        def switched() -> Node | None:
            ports = {
                self._named_by(sentinel)
                for sentinel in self.sentinels
                if sentinel.alive and not sentinel.frozen
            }
            if len(ports) != 1 or old.port in ports or None in ports:
                return None
            new = self.node(ports.pop() or 0)
            return new if self._quietly(lambda: new.role() == "master") else None

        new = wait_until(switched, timeout, f"a primary other than port {old.port}")
        assert new is not None  # wait_until returns only a truthy value
        return new

    def wait_replica_of(self, node: Node, primary: Node | None = None, timeout: float = 60) -> None:
        """Until `node` (a restarted old primary, say) replicates `primary`, online there; with
        no `primary`, the one the sentinels name at each look: on a loaded machine a primary
        just promoted can itself miss `down-after-milliseconds` (busy with its replicas' full
        syncs) and be failed over again, so the node ends up following the next one."""

        def following() -> bool:
            current = primary or self.primary()
            with node.client() as client:
                role = client.execute_command("ROLE")
            if str(role[0]) != "slave" or int(role[2]) != current.port:
                return False
            with current.client() as client:
                info = client.info("replication")
            return any(
                isinstance(value, dict)
                and int(value.get("port", 0)) == node.port
                and value.get("state") == "online"
                for key, value in info.items()
                if key.startswith("slave")
            )

        wait_until(
            lambda: self._quietly(following), timeout, f"port {node.port} replicating the primary"
        )

    def settle(self, timeout: float = 60) -> None:
        """Wait until every live data node but the primary replicates it, online."""
        live = sum(1 for node in self.nodes if node.alive and not node.frozen)
        self.wait_replicas_online(live - 1, timeout)

    # --- internals --------------------------------------------------------------------------

    def _named_by(self, sentinel: Node) -> int | None:
        """The primary as `sentinel` tells clients (SENTINEL MASTERS, what redis-py asks: it
        switches at the end of a failover, after `get-master-addr-by-name` does)."""
        try:
            with sentinel.client(timeout=1) as client:
                state = client.sentinel_masters()[MASTER]
        except (redis.RedisError, KeyError):
            return None
        return int(state["port"])

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            try:
                with sentinel.client(timeout=1) as client:
                    fields = client.sentinel_master(MASTER)
            except redis.RedisError:
                return False
            if int(fields["num-slaves"]) < len(self.nodes) - 1:
                return False
            if int(fields["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
        return True

    @staticmethod
    def _quietly(check: Callable[[], object]) -> bool:
        with contextlib.suppress(redis.RedisError, OSError):
            return bool(check())
        return False
