"""The real `appliance serve` as a subprocess on a free port with its own data dir (vLLM's RemoteOpenAIServer)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

DEFAULT_MODEL = "smollm2-135m-instruct"
WORKER_MODULE = "appliance.engines.llamacpp_worker"
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-generation tokens as a logit_bias that bans them: max_tokens exactly


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something true, and return that: the state a test waits for, never a length
    of time. A connection error counts as not yet (a server coming up or restarting); after `timeout` seconds the
    test fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if found := condition():
                return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def appliance(*args: str, data_dir: Path, env: Mapping[str, str] | None = None, check: bool = True,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI."""
    full_env = {**os.environ, "APPLIANCE_DATA_DIR": str(data_dir), **(env or {})}
    result = subprocess.run([sys.executable, "-m", "appliance", *args], env=full_env, capture_output=True,
                            text=True, input=input, timeout=600, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clone_data_dir(template: Path, target: Path) -> Path:
    """Copy a prepared data dir; model blobs are hard-linked (read-only to the appliance), the rest copied."""

    def copy(src: str, dst: str) -> object:
        if Path(src).parent.name == "models":
            os.link(src, dst)
            return dst
        return shutil.copy2(src, dst)

    shutil.copytree(template, target, copy_function=copy, ignore=shutil.ignore_patterns("*.sock"))
    return target


class ServerProcess:
    def __init__(self, data_dir: Path, env: Mapping[str, str] | None = None, own_group: bool = False) -> None:
        """`own_group`: the server leads a process group of its own, so that `kill_tree` can kill it as a whole."""
        self.data_dir = data_dir
        self.own_group = own_group
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "APPLIANCE_DATA_DIR": str(data_dir), "APPLIANCE_LOGGING__FORMAT": "json",
                    **(env or {})}
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> ServerProcess:
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--port", str(self.port)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=self.own_group)
        self.wait_for("/readyz" if wait_ready else "/healthz", timeout)
        return self

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_for(self, path: str, timeout: float = 120.0) -> None:
        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"appliance serve exited {self.proc.returncode}")
            return httpx.get(self.url + path, timeout=2).status_code == 200

        try:
            wait_until(answers, f"{path} to answer 200", timeout, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log_tail()}") from None

    def workers(self) -> list[psutil.Process]:
        """The worker processes this server spawned (they run in their own session)."""
        assert self.proc is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                    if WORKER_MODULE in " ".join(p.cmdline())]
        return []

    def kill_tree(self) -> int:
        """SIGKILL to the server and everything below it, one process group at a time (the workers lead sessions of
        their own), as a power cut or the OOM killer's cgroup kill would; returns how many processes there were."""
        assert self.own_group and self.proc is not None, "start the server with own_group=True"
        root = psutil.Process(self.proc.pid)
        tree = [root, *root.children(recursive=True)]
        groups = set()
        for proc in tree:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(proc.pid))
        assert os.getpgid(0) not in groups, "the server shares the test's process group"
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL
        psutil.wait_procs(tree[1:], timeout=30)
        return len(tree)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        workers = self.workers()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        return self.proc.returncode


def new_key(data_dir: Path, role: str = "admin", expires: str | None = None,
            env: dict[str, str] | None = None) -> str:
    args = ["keys", "create", "--name", "test", "--role", role] + (["--expires", expires] if expires else [])
    return appliance(*args, data_dir=data_dir, env=env).stdout.strip().splitlines()[-1]


OPEN_CLIENTS: list[openai.OpenAI] = []
"""SDK clients made by `Running.client`; tests/conftest.py closes them after each test."""


class Running:
    """A server under test: its URL, an admin key, and (when local) the process and data dir."""

    def __init__(self, url: str, key: str, process: ServerProcess | None = None) -> None:
        self.url = url
        self.key = key
        self.process = process

    def client(self, key: str | None = None, **kwargs: object) -> openai.OpenAI:
        """An openai SDK client for this server (the admin key unless `key`); closed after the test."""
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0,
                               **kwargs)  # type: ignore[arg-type]
        OPEN_CLIENTS.append(client)
        return client

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}
