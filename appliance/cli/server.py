"""`appliance init`, `serve`, `doctor` and `config show`."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from appliance.cli.common import Add
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def cmd_init(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    data = DataDir(loaded.settings.data_path)
    created = data.initialise()
    print(f"{'initialised' if created else 'already initialised'}: {data.root}")
    return 0


def cmd_serve(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    import msgspec
    import uvicorn

    from appliance import logs, memory

    memory.limit_arenas()  # before the threads that would each take an arena of their own
    from appliance.app import create_app
    from appliance.supervisor import systemd

    given = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    server = msgspec.structs.replace(loaded.settings.server, **given)
    settings = msgspec.structs.replace(loaded.settings, server=server)
    # what the server runs with, each value's source included (GET /api/settings)
    loaded = dataclasses.replace(loaded, settings=settings,
                                 sources={**loaded.sources, **{f"server.{k}": "command line" for k in given}})
    os.umask(0o077)  # the database's WAL and anything else created at run time stays private
    logs.configure(settings.logging)
    app = create_app(settings, loaded)
    config = uvicorn.Config(app, host=server.host, port=server.port, lifespan="on", access_log=False,
                            log_config=None, log_level="warning", timeout_graceful_shutdown=int(server.drain_seconds),
                            server_header=False)
    systemd.run_with_notify(config, app)
    return 0


def cmd_doctor(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.doctor import run_doctor

    return run_doctor(loaded.settings)


def cmd_config_show(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    print(f"# config file: {loaded.config_file or '(none)'}")
    for info in loaded.describe():
        print(f"{info.key} = {info.value!r}\n    # {info.help} [{info.source}]")
    return 0


def register(sub: Any, add: Add) -> None:
    add("init", cmd_init, "create the data directory, master key and database (idempotent)")
    serve = add("serve", cmd_serve, "run the server and its model workers in the foreground")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    add("doctor", cmd_doctor, "hardware, engines, memory, disk, permissions and what would run where")
    config = sub.add_parser("config", help="settings").add_subparsers(dest="sub", required=True)
    add("show", cmd_config_show, "print every setting, its value, where it came from and what it does", config)
