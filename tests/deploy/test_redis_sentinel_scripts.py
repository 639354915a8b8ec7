"""deploy/k8s/redis-sentinel's init scripts, run for real: each data node's and sentinel's config
is what redis-node-init.sh / sentinel-init.sh write from the manifests' own settings (only the
addresses, directories and the sentinels' timers are the test's), and real redis-server and
`--sentinel` processes run from it on 127.0.0.1. Every node is named `localhost`, so
resolve-hostnames / announce-hostnames are used as in the cluster. The scripts' role choice is
what is checked: the first start (node 0 the primary), a primary restarted after a failover,
a primary back before the sentinels noticed it gone, a sentinel restarted after a failover;
and the dispatcher's own REDIS_URL (the manifest's, addresses swapped) reaching the primary.

Servers: started under /tmp/heavy-tests.lock (tests/deploy runs them), stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest
import redis
import yaml

from devstack.processes import ManagedProcess, ProcessServer, StopsOnExit, free_port, wait_until
from devstack.redis import find_redis_server
from shared.redis_connect import sync_client
from shared.redis_url import parse_sentinel_url
from shared.settings import Settings
from tests.deploy.sentinel_manifests import (
    COMPONENT,
    NODE_SCRIPT,
    SENTINEL_SCRIPT,
    init_env,
)
from tests.support.deploy_files import environment, service

HOST = "localhost"  # a name: the configs resolve and announce hostnames, as in the cluster
NODE_SETTINGS = init_env("redis-node")
SENTINEL_SETTINGS = init_env("redis-sentinel")
MASTER = NODE_SETTINGS["MASTER_NAME"]
# The sentinels' timers, short for the test (the manifest's: 5 s and 30 s).
FAST = {"DOWN_AFTER_MS": "1000", "FAILOVER_TIMEOUT_MS": "5000"}

pytestmark = pytest.mark.usefixtures("clean_env")


class Scripted(ProcessServer):
    """A redis-server (or sentinel) whose config its init script writes before every start."""

    program = "redis-server"

    def __init__(self, workdir: Path, script: Path, env: dict[str, str], sentinel: bool) -> None:
        super().__init__()
        self.workdir = workdir
        self.script = script
        self.env = env
        self.sentinel = sentinel
        self.port = int(env["SELF"].rsplit(":", 1)[1])
        self.conf = workdir / "conf" / ("sentinel.conf" if sentinel else "redis.conf")
        self.password = env["SENTINEL_PASSWORD" if sentinel else "REDIS_PASSWORD"]
        self.init_log = ""

    def render(self) -> str:
        """Run the init script as the init container does; its config, as written."""
        result = subprocess.run(
            ["sh", str(self.script)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        self.init_log = result.stderr
        assert result.returncode == 0, result.stderr
        return self.conf.read_text()

    def start(self) -> Self:
        self.render()
        argv = [
            str(find_redis_server()),
            str(self.conf),
            *(["--sentinel"] if self.sentinel else []),
        ]
        self._process = ManagedProcess(argv, self.workdir / "server.log", cwd=self.workdir).start()
        wait_until(self._answers, 15, f"redis-server on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password,
            socket_timeout=2, socket_connect_timeout=2, decode_responses=True,
        )  # fmt: skip

    def config_lines(self, directive: str) -> list[str]:
        return [line for line in self.conf.read_text().splitlines() if line.startswith(directive)]

    def _answers(self) -> bool:
        assert self._process is not None
        self._process.check_alive(f"redis-server on port {self.port}")
        with contextlib.suppress(redis.RedisError), self.client() as client:
            return bool(client.ping())
        return False


class Topology(StopsOnExit):
    """3 data nodes and 3 sentinels, each configured by its script from the manifest's env."""

    def __init__(
        self,
        workdir: Path,
        node_settings: dict[str, str] = NODE_SETTINGS,
        sentinel_settings: dict[str, str] = SENTINEL_SETTINGS,
    ) -> None:
        self.redis_password = secrets.token_hex(16)
        self.sentinel_password = secrets.token_hex(16)
        node_ports = [free_port() for _ in range(3)]
        sentinel_ports = [free_port() for _ in range(3)]
        common = {
            "PATH": f"{find_redis_server().parent}{os.pathsep}{os.environ['PATH']}",
            "NODES": " ".join(f"{HOST}:{port}" for port in node_ports),
            "SENTINELS": " ".join(f"{HOST}:{port}" for port in sentinel_ports),
            "BIND": "127.0.0.1",
            "REDIS_PASSWORD": self.redis_password,
            "SENTINEL_PASSWORD": self.sentinel_password,
        }
        self.nodes = [
            Scripted(workdir / f"node-{n}", NODE_SCRIPT, {
                **node_settings, **common, "SELF": f"{HOST}:{port}", "HANDOVER_SECONDS": "30",
                "CONF_DIR": str(workdir / f"node-{n}" / "conf"),
                "DATA_DIR": str(workdir / f"node-{n}" / "data"),
            }, sentinel=False)
            for n, port in enumerate(node_ports)
        ]  # fmt: skip
        self.sentinels = [
            Scripted(workdir / f"sentinel-{n}", SENTINEL_SCRIPT, {
                **sentinel_settings, **FAST, **common, "SELF": f"{HOST}:{port}",
                "CONF_DIR": str(workdir / f"sentinel-{n}" / "conf"),
            }, sentinel=True)
            for n, port in enumerate(sentinel_ports)
        ]  # fmt: skip
        for server in self.nodes:
            (server.workdir / "data").mkdir(parents=True)

    def start(self) -> Self:
        for server in [*self.nodes, *self.sentinels]:
            server.start()
        wait_until(self.settled, 60, "sentinels that know 2 replicas and 2 peers")
        return self

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.stop()

    def named(self, sentinel: Scripted) -> tuple[str, int] | None:
        """The primary a sentinel names, as clients are told (SENTINEL MASTERS)."""
        with contextlib.suppress(redis.RedisError, KeyError), sentinel.client() as client:
            state = client.sentinel_masters()[MASTER]
            return str(state["ip"]), int(state["port"])
        return None

    def primary(self) -> Scripted:
        """The node every live sentinel names, once they agree and it says it is one."""

        def agreed() -> Scripted | None:
            names = {self.named(s) for s in self.sentinels if s.alive}
            if len(names) != 1 or None in names:
                return None
            (name,) = names
            assert name is not None
            node = next(n for n in self.nodes if n.port == name[1])
            return node if node.alive and role(node)[0] == "master" else None

        return wait_until(agreed, 60, "sentinels that agree on a primary")

    def settled(self) -> bool:
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError), sentinel.client() as client:
                fields = client.sentinel_master(MASTER)
                if int(fields["num-slaves"]) >= 2 and int(fields["num-other-sentinels"]) >= 2:
                    continue
            return False
        return True

    def dispatcher_settings(self) -> Settings:
        """The dispatcher's settings as its pods get them, the sentinels' names swapped for ours."""
        docs = yaml.safe_load_all((COMPONENT / "dispatcher-env.yaml").read_text())
        env = {
            item["name"]: item.get("value")
            for item in next(iter(docs))["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        url = str(env["REDIS_URL"]).replace("$(REDIS_PASSWORD)", self.redis_password)
        for n, sentinel in enumerate(self.sentinels):
            url = url.replace(f"redis-sentinel-{n}.redis-sentinel:26379", f"{HOST}:{sentinel.port}")
        assert [port for _, port in parse_sentinel_url(url).sentinels] == [
            s.port for s in self.sentinels
        ]
        return Settings(
            _env_file=None, redis_url=url, redis_sentinel_master=MASTER,
            redis_sentinel_password=self.sentinel_password,
        )  # fmt: skip


def role(node: Scripted) -> list[object]:
    with node.client() as client:
        reply: list[object] = client.execute_command("ROLE")
        return reply


def replicating(node: Scripted, primary: Scripted) -> bool:
    with contextlib.suppress(redis.RedisError):
        found = role(node)
        return (
            found[0] == "slave" and int(str(found[2])) == primary.port and found[3] == "connected"
        )
    return False


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    wait_until(check, timeout, what, interval=0.1)


def compose_settings(name: str) -> dict[str, str]:
    """A compose service's script settings: its environment but for the addresses,
    directories and passwords (interpolated by compose), which are the test's."""
    own = {"SELF", "NODES", "SENTINELS", "CONF_DIR", "DATA_DIR"}
    env = environment(service(name))
    return {k: v for k, v in env.items() if k not in own and "PASSWORD" not in k}


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    with Topology(tmp_path).start() as started:
        yield started


@pytest.mark.parametrize("source", ["k8s", "compose"])
def test_first_start_node_0_primary_the_others_its_replicas(tmp_path: Path, source: str) -> None:
    """With the manifests' settings and with the compose profile's (same scripts)."""
    if source == "compose":
        settings = compose_settings("redis-1"), compose_settings("sentinel-1")
        assert settings[0]["MASTER_NAME"] == MASTER
    else:
        settings = NODE_SETTINGS, SENTINEL_SETTINGS
    with Topology(tmp_path, *settings).start() as topology:
        check_first_start(topology)


def check_first_start(topology: Topology) -> None:
    first, *others = topology.nodes
    assert topology.primary() is first
    assert first.config_lines("replicaof") == []
    for node in others:
        assert node.config_lines("replicaof") == [f"replicaof {HOST} {first.port}"]
        wait_for(lambda node=node: replicating(node, first), "replicas online")  # type: ignore[misc]
    with first.client() as client:
        settings = client.config_get("*")
        assert settings["appendonly"] == "yes"
        assert settings["appendfsync"] == NODE_SETTINGS["APPENDFSYNC"]
        assert settings["min-replicas-to-write"] == NODE_SETTINGS["MIN_REPLICAS_TO_WRITE"]
        assert settings["min-replicas-max-lag"] == NODE_SETTINGS["MIN_REPLICAS_MAX_LAG"]
        assert settings["maxmemory-policy"] == "noeviction"
    with pytest.raises(redis.AuthenticationError), redis.Redis(port=first.port) as anonymous:
        anonymous.set("k", "v")  # requirepass: no password, no write
    sentinel = topology.sentinels[0]
    with sentinel.client() as client:
        assert {r["ip"] for r in client.sentinel_slaves(MASTER)} == {HOST}  # names, not IPs
        assert topology.named(sentinel) == (HOST, first.port)
    # The dispatcher's REDIS_URL, as its pods have it, reaches the primary through the sentinels.
    with sync_client(
        topology.dispatcher_settings(), socket_timeout=2, socket_connect_timeout=2
    ) as client:
        client.set("dispatch:probe", "1")
        assert client.execute_command("WAIT", 2, 2000) == 2


def test_a_lone_primary_refuses_writes(tmp_path: Path) -> None:
    """min-replicas-to-write: with no replica, the primary takes no write (as an old primary
    cut off from the others does once they lag past min-replicas-max-lag)."""
    topology = Topology(tmp_path)
    with (
        topology.nodes[0].start() as lone,
        lone.client() as client,
        pytest.raises(redis.ResponseError, match="NOREPLICAS"),
    ):
        client.set("k", "v")


def test_a_primary_restarted_after_a_failover_comes_back_as_a_replica(topology: Topology) -> None:
    old = topology.primary()
    with old.client() as client:
        client.set("accepted", "1")
        assert client.execute_command("WAIT", 2, 2000) == 2
    old.kill()
    new = wait_until(lambda: (p := topology.primary()) is not old and p, 60, "a new primary")
    old.start()  # its init asks the sentinels first
    assert old.config_lines("replicaof") == [f"replicaof {HOST} {new.port}"]
    wait_for(lambda: replicating(old, new), "the old primary replicating the new one")
    with old.client() as client:
        assert client.get("accepted") == "1"
    assert topology.primary() is new


def test_a_primary_back_before_the_sentinels_notice_waits_for_a_handover(
    topology: Topology,
) -> None:
    """Killed and restarted at once (a container restart), the primary still named by the
    sentinels does not start as the primary with its AOF: it waits for a live replica to be
    promoted, then follows it; what every replica acknowledged is there."""
    old = topology.primary()
    with old.client() as client:
        client.set("accepted", "2")
        assert client.execute_command("WAIT", 2, 2000) == 2
    old.kill()
    old.start()
    assert old.config_lines("replicaof"), old.init_log
    new = topology.primary()
    assert new is not old
    assert old.config_lines("replicaof") == [f"replicaof {HOST} {new.port}"]
    wait_for(lambda: replicating(old, new), "the old primary replicating the new one")
    with new.client() as client:
        assert client.get("accepted") == "2"


def test_a_sentinel_restarted_after_a_failover_watches_the_new_primary(
    topology: Topology,
) -> None:
    old = topology.primary()
    first, *_, last = topology.sentinels
    deadline = time.monotonic() + 30
    while True:  # refused while the sentinels still settle (INPROG, NOGOODSLAVE)
        try:
            with first.client() as client:
                client.execute_command("SENTINEL", "FAILOVER", MASTER)
            break
        except redis.ResponseError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    new = wait_until(lambda: (p := topology.primary()) is not old and p, 60, "a new primary")
    last.kill()
    last.start()  # a fresh config: its init asks the other sentinels
    (monitor,) = last.config_lines("sentinel monitor")
    assert monitor.split()[3:5] == [HOST, str(new.port)]
    wait_for(topology.settled, "the restarted sentinel knowing 2 replicas and 2 peers")
    assert topology.named(last) == (HOST, new.port)
