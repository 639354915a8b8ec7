"""A real TorchServe for the local stack: model archives, config, start until every model serves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx

from devstack.processes import ManagedProcess, ProcessServer, free_port, wait_until

HOST = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent


def _venv_tool(name: str) -> str:
    """A console script of this interpreter's environment, else whatever PATH has."""
    candidate = VENV_BIN / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: run scripts/bootstrap.sh")
    return found


def archive_model(
    name: str,
    handler: Path,
    export_dir: Path,
    version: str = "1.0",
    extra_files: Sequence[Path] = (),
    *,
    mar_name: str | None = None,
) -> Path:
    """Package a handler-only model (no weights file) as `<mar_name or name>.mar` in `export_dir`.

    `mar_name` lets two versions of one model sit in the same store: TorchServe takes the
    model name and version from the archive's manifest, not from the file name.
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    target = export_dir / f"{mar_name or name}.mar"
    # The archiver names its output after the model; build elsewhere, then move into place.
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=".archive-") as scratch:
        argv = [
            _venv_tool("torch-model-archiver"),
            "--model-name", name,
            "--version", version,
            "--handler", str(handler),
            "--export-path", scratch,
            "--force",
        ]  # fmt: skip
        if extra_files:
            argv += ["--extra-files", ",".join(str(path) for path in extra_files)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            raise RuntimeError(f"torch-model-archiver failed for {name} ({handler}):\n{output}")
        Path(scratch, f"{name}.mar").replace(target)
    return target


def manifest(mar: Path) -> dict[str, Any]:
    """The MANIFEST.json of a model archive (model name, version, handler)."""
    with zipfile.ZipFile(mar) as archive:
        data: dict[str, Any] = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        return data


class TorchServe(ProcessServer):
    """One TorchServe (Java frontend plus a Python worker per model worker) in its own workdir.

    The workdir holds config.properties, TorchServe's logs, its key file and its temp dir
    (unpacked archives, worker sockets, the pid file), so several instances can run side by side.
    `stop()` and `kill()` end the frontend and its model workers (one process group).
    """

    program = "TorchServe"

    def __init__(
        self,
        workdir: Path,
        model_store: Path,
        models: Sequence[str],
        ports: tuple[int, int, int] | None = None,
        workers_per_model: int = 1,
        job_queue_size: int = 100,
        token_auth: bool = False,
        extra_config: Mapping[str, str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        response_timeout: int = 120,
    ) -> None:
        self.workdir = workdir
        self.model_store = model_store
        self.models = list(models)
        inference, management, metrics = ports or (free_port(), free_port(), free_port())
        self.ports = (inference, management, metrics)
        # gRPC cannot be switched off; its default ports (7070/7071) would collide between
        # instances, so they get free ports too.
        self.grpc_ports = (free_port(), free_port())
        self.workers_per_model = workers_per_model
        self.job_queue_size = job_queue_size
        self.token_auth = token_auth
        self.extra_config = dict(extra_config or {})
        self.env = dict(env or {})
        self.response_timeout = response_timeout
        self.log_path = workdir / "torchserve.log"
        self.config_path = workdir / "config.properties"
        self.start_seconds: float | None = None
        super().__init__()

    # --- addresses and credentials -------------------------------------------------------

    @property
    def inference_url(self) -> str:
        return f"http://{HOST}:{self.ports[0]}"

    @property
    def management_url(self) -> str:
        return f"http://{HOST}:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports[2]}"

    @property
    def logs_dir(self) -> Path:
        """TorchServe's own log files (ts_log, model_log, access_log: its log4j default, under
        its working directory); `log_path` holds only what the CLI prints."""
        return self.workdir / "logs"

    @property
    def inference_token(self) -> str | None:
        """The key for `Authorization: Bearer` on /predictions and /ping (None without auth)."""
        return self._key("inference")

    @property
    def management_token(self) -> str | None:
        return self._key("management")

    def _key(self, which: str) -> str | None:
        if not self.token_auth:
            return None
        # TorchServe writes key_file.json into the directory it was started from once it runs,
        # not atomically: while starting, the file can be missing or empty. (Keys expire after
        # `token_expiration_min`, 60 by default.)
        try:
            keys = json.loads((self.workdir / "key_file.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        key: str = keys[which]["key"]
        return key

    # --- lifecycle ------------------------------------------------------------------------

    def config_text(self) -> str:
        inference, management, metrics = self.ports
        config = {
            "inference_address": f"http://{HOST}:{inference}",
            "management_address": f"http://{HOST}:{management}",
            "metrics_address": f"http://{HOST}:{metrics}",
            "grpc_inference_port": str(self.grpc_ports[0]),
            "grpc_management_port": str(self.grpc_ports[1]),
            "model_store": str(self.model_store),
            "load_models": ",".join(self.models) if self.models else "",
            "default_workers_per_model": str(self.workers_per_model),
            "job_queue_size": str(self.job_queue_size),
            "enable_model_api": "true",
            "metrics_mode": "prometheus",
            "default_response_timeout": str(self.response_timeout),
            **({} if self.token_auth else {"disable_token_authorization": "true"}),
            **self.extra_config,
        }
        return "".join(f"{key}={value}\n" for key, value in config.items() if value != "")

    def process_env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        return {
            **os.environ,
            # TorchServe starts model workers as plain `python`: it must be this venv's.
            "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
            # TMPDIR: the CLI's pid file; TEMP: Java's temp dir (unpacked .mar files and the
            # workers' Unix sockets, whose names would clash between instances).
            "TMPDIR": str(tmp),
            "TEMP": str(tmp),
            **self.env,
        }

    def start(self, timeout: float = 120) -> Self:
        """Start, then wait until every loaded model has a READY worker (not just /ping)."""
        if self.alive:
            raise RuntimeError(f"TorchServe is running already (pid {self.pid})")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        argv = [
            _venv_tool("torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config", str(self.config_path),
            "--model-store", str(self.model_store),
        ]  # fmt: skip
        names = self.model_names()
        began = time.monotonic()
        self._process = ManagedProcess(
            argv, self.log_path, cwd=self.workdir, env=self.process_env()
        ).start()
        try:
            wait_until(lambda: self._all_ready(names), timeout, f"TorchServe models {names}", 0.1)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    # --- management API -------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The model names of `models`: `name=x.mar` entries, else each archive's manifest."""
        names = []
        for entry in self.models:
            name, sep, _ = entry.partition("=")
            names.append(name if sep else manifest(self.model_store / entry)["model"]["modelName"])
        return names

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        """`GET /models/<model>[/<version>|/all]`: one description per version."""
        path = f"/models/{model}" + (f"/{version}" if version else "/all")
        response = self._management("GET", path)
        response.raise_for_status()
        descriptions: list[dict[str, Any]] = response.json()
        return descriptions

    def ready(self, model: str) -> bool:
        """Whether every registered version of `model` has at least one READY worker."""
        try:
            descriptions = self.describe(model)
        except httpx.HTTPError:  # not listening yet, or the model is still being registered
            return False
        return bool(descriptions) and all(
            any(worker.get("status") == "READY" for worker in description.get("workers", []))
            for description in descriptions
        )

    def register(self, mar_name: str, initial_workers: int = 1, timeout: float = 120) -> None:
        """Register an archive of the model store (e.g. a second version) and wait for workers.

        Registrations are not kept across a restart (`--ncs`: no config snapshots); `start()`
        loads `models` only.
        """
        params: dict[str, str | int] = {
            "url": mar_name,
            "initial_workers": initial_workers,
            "synchronous": "true",
        }
        response = self._management("POST", "/models", params=params, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"registering {mar_name} failed: {response.text}")

    def scale(
        self, model: str, workers: int, version: str | None = None, timeout: float = 120
    ) -> None:
        """Set a model's worker count (min and max) and wait until they run."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        params: dict[str, str | int] = {
            "min_worker": workers,
            "max_worker": workers,
            "synchronous": "true",
        }
        response = self._management("PUT", path, params=params, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"scaling {model} to {workers} workers failed: {response.text}")

    def _all_ready(self, names: Sequence[str]) -> bool:
        assert self._process is not None
        self._process.check_alive("TorchServe")
        if not names:
            try:
                return self._management("GET", "/models").status_code == 200
            except httpx.HTTPError:
                return False
        return all(self.ready(name) for name in names)

    def _management(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        timeout: float = 5,
    ) -> httpx.Response:
        token = self.management_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(
            method,
            self.management_url + path,
            params=params,
            headers=headers,
            timeout=timeout,
        )
