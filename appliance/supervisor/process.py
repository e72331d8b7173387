"""One model worker as a child process: spawn, readiness, health, stop, and the tail of its output.

The recipe: bind the Unix socket (0600) here and hand its descriptor to the child; start the child in its
own session so a terminal's Ctrl-C or a service manager's SIGTERM reaches only the supervisor (which drains
first); a reaper task awaits the process and sets `exited`; readiness polls /health, fails at once if the
process exited, and gives up after a stall with no output; stop = SIGTERM, wait, SIGKILL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from appliance.errors import InvalidRequest, ModelUnavailable
from appliance.logs import get_logger
from appliance.supervisor.uds import worker_transport

log = get_logger(__name__)
SECRET_ENV_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "HEADERS")  # OTEL_*_HEADERS carry credentials


class Worker(Protocol):
    """What the gateway and the pool see of a worker, whatever the engine."""

    model: str
    exited: asyncio.Event
    client: httpx.AsyncClient

    async def start(self) -> None: ...
    async def wait_ready(self) -> None: ...
    async def health(self) -> dict[str, Any]: ...
    async def stop(self) -> None: ...
    @property
    def pid(self) -> int | None: ...
    def failure(self) -> str: ...


class WorkerStartError(ModelUnavailable):
    code = "model_load_failed"


@dataclass(frozen=True)
class LaunchSpec:
    """How to run one engine's worker: argv (with `{fd}` standing for the inherited socket descriptor)."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    inherit_socket: bool = True
    pass_fds: Sequence[int] = ()
    """More descriptors the child inherits under the same numbers (the decrypted weights' memfd)."""


@contextlib.contextmanager
def sealed_memfd(name: str, data: bytes) -> Iterator[int]:
    """A memory file holding `data`, sealed against change, for a child to inherit (in `LaunchSpec.pass_fds`): how
    a secret reaches a worker without argv or the environment, which other processes of the user can read. Its
    memory is freed once this and the child's copy are closed (the worker closes its copy after reading)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        yield fd
    finally:
        os.close(fd)


async def worker_tokenize(client: httpx.AsyncClient, model: str, text: str, purpose: str) -> dict[str, Any]:
    """A worker's `/tokenize` of `text` without special tokens (vLLM's route; the llama.cpp worker serves the same):
    {"count", "max_model_len", "tokens"}. `purpose` ends the error messages ("for RAG")."""
    try:
        response = await client.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
    except httpx.TransportError as exc:
        raise InvalidRequest(f"could not count tokens with model '{model}' {purpose} ({type(exc).__name__}); retry",
                             code="tokenize_failed") from exc
    if response.status_code != 200:
        raise InvalidRequest(f"model '{model}' cannot count tokens {purpose} (its worker answered "
                             f"{response.status_code} to /tokenize)", param="model", code="tokenize_unsupported")
    data: dict[str, Any] = response.json()
    return data


def redacted_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: ("[redacted]" if any(m in k.upper() for m in SECRET_ENV_MARKERS) else v) for k, v in env.items()}


def bind_unix_socket(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(0o600)
    sock.listen(128)
    return sock


class WorkerProcess:
    engine = "llama.cpp"  # gen_ai.provider.name of what it serves (the engines' workers say their own)

    def __init__(self, model: str, launch: LaunchSpec, socket_path: Path, *, load_timeout: float,
                 stop_timeout: float, request_timeout: float) -> None:
        self.model = model
        self.launch = launch
        self.socket_path = socket_path
        self.load_timeout = load_timeout
        self.stop_timeout = stop_timeout
        self.exited = asyncio.Event()
        self.client = httpx.AsyncClient(
            transport=worker_transport(socket_path), base_url="http://worker",
            timeout=httpx.Timeout(request_timeout, connect=5.0),
        )
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._last_output = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def failure(self) -> str:
        lines = " | ".join(line for line in self._tail if line.strip())[-1500:]
        return f"exit code {self.returncode}; last output: {lines or '(none)'}"

    async def start(self) -> None:
        sock = bind_unix_socket(self.socket_path) if self.launch.inherit_socket else None
        try:
            fd = sock.fileno() if sock else -1
            argv = [a.replace("{fd}", str(fd)) for a in self.launch.argv]
            env = {**os.environ, **self.launch.env, "PYTHONUNBUFFERED": "1"}
            log.info("worker.spawn", model=self.model, argv=argv, env=redacted_env(self.launch.env))
            self._proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=((fd,) if sock else ()) + tuple(self.launch.pass_fds), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            )
        finally:
            if sock is not None:
                sock.close()  # the child holds its own copy
        self._last_output = time.monotonic()
        self._tasks = [asyncio.create_task(self._reap()), asyncio.create_task(self._read_output())]

    async def _reap(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        if not self.stopping:
            log.warning("worker.exited", model=self.model, pid=self._proc.pid, code=code)
        self.exited.set()

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self._tail.append(line)
            self._last_output = time.monotonic()
            log.info("worker.output", model=self.model, line=line)  # a few lines per load; never request text

    async def wait_ready(self) -> None:
        """Poll /health until it answers; fail at once if the process exits, or after a stall."""
        while True:
            if self.exited.is_set():
                raise WorkerStartError(f"model '{self.model}' failed to load: {self.failure()}")
            if time.monotonic() - self._last_output > self.load_timeout:
                await self.stop()
                raise WorkerStartError(
                    f"model '{self.model}' showed no progress for {self.load_timeout:.0f}s while loading and was "
                    f"stopped; raise supervisor.load_timeout for very large models ({self.failure()})"
                )
            with contextlib.suppress(httpx.TransportError):
                response = await self.client.get("/health", timeout=1.0)
                if response.status_code == 200:
                    return
            exited = asyncio.ensure_future(self.exited.wait())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited, 0.05)

    async def health(self) -> dict[str, Any]:
        response = await self.client.get("/health", timeout=5.0)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def stop(self) -> None:
        self.stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(self.exited.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("worker.kill", model=self.model, pid=proc.pid, after_s=self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await self.exited.wait()
        for task in self._tasks:
            task.cancel()
        await self.client.aclose()
        if self.launch.inherit_socket:
            self.socket_path.unlink(missing_ok=True)
