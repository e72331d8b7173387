"""systemd integration: READY=1 once the default model serves, STOPPING=1 on shutdown, watchdog pings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn
import uvloop


def notify(message: str) -> None:
    """sd_notify(3) without libsystemd; a no-op outside a Type=notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


async def _notify_loop(server: uvicorn.Server, app: Any) -> None:
    services = app.state.services
    default = services.settings.models.default
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    interval = watchdog_usec / 2e6 if watchdog_usec else 1.0
    ready = False
    while not server.should_exit:
        if not ready and server.started and (services.pool.is_ready(default) or
                                             services.registry.find(default) is None):
            notify("READY=1")
            ready = True
        if watchdog_usec and server.started:
            notify("WATCHDOG=1")
        await asyncio.sleep(min(interval, 1.0))
    notify("STOPPING=1")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with our signal handling: the first SIGTERM/SIGINT drains in-flight requests and the
    process exits 0; a second one stops at once. (uvicorn itself re-raises the signal after shutdown.)"""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


class PortUnavailable(ValueError):
    """The HTTP port cannot be bound; raised before any model worker starts."""


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind the server's socket before anything else starts, so a busy port fails fast and clearly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortUnavailable(
            f"cannot listen on {host}:{port} ({exc.strerror}); is another appliance running? Stop it, or pick "
            f"another port with --port or APPLIANCE_SERVER__PORT"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def run_with_notify(config: uvicorn.Config, app: Any) -> None:
    listener = bind_listener(config.host, config.port)
    print(f"appliance serving on http://{config.host}:{config.port} (data: {app.state.services.settings.data_dir})",
          file=sys.stderr, flush=True)
    server = DrainingServer(config)

    async def main() -> None:
        task = asyncio.create_task(_notify_loop(server, app))
        try:
            await server.serve(sockets=[listener])
        finally:
            task.cancel()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
