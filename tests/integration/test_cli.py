"""The `appliance` command as users and scripts run it."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from appliance.config import Settings, iter_documented_fields
from tests.integration.conftest import Running, new_key
from tests.server import DEFAULT_MODEL, appliance, clone_data_dir


@pytest.fixture
def data_dir(template_dir: Path, tmp_path: Path) -> Path:
    return clone_data_dir(template_dir, tmp_path / "data")


def test_init_is_idempotent_and_private(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    assert "initialised" in appliance("init", data_dir=data).stdout
    key_before = (data / "keys" / "master.key").read_bytes()
    assert "already initialised" in appliance("init", data_dir=data).stdout
    assert (data / "keys" / "master.key").read_bytes() == key_before
    for path, mode in ((data, 0o700), (data / "keys", 0o700), (data / "run", 0o700),
                       (data / "keys" / "master.key", 0o600), (data / "appliance.db", 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_python_dash_m_and_console_script_agree(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = appliance("--help", data_dir=tmp_path)
    for command in ("init", "serve", "doctor", "models", "keys", "users", "audit", "config"):
        assert command in result.stdout
    script = Path(sys.executable).parent / "appliance"
    assert script.is_file(), "the console script is installed next to the interpreter"
    direct = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert direct.stdout == result.stdout


def test_config_show_lists_every_setting_with_its_source(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text("[server]\nport = 9123\n")
    out = appliance("config", "show", data_dir=tmp_path / "d",
                    env={"APPLIANCE_CONFIG": str(config), "APPLIANCE_GATEWAY__MAX_QUEUE": "7"}).stdout
    for key, _ in iter_documented_fields(Settings):
        assert f"\n{key} = " in "\n" + out, key
    assert "server.port = 9123" in out and f"file {config}" in out
    assert "gateway.max_queue = 7" in out and "env APPLIANCE_GATEWAY__MAX_QUEUE" in out


def test_invalid_config_stops_with_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text("[server]\nport = 'eighty'\n")
    result = appliance("config", "show", data_dir=tmp_path / "d", env={"APPLIANCE_CONFIG": str(config)},
                       check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.port" in lines[0], result.stderr


def test_models_list_verify_and_rm(data_dir: Path) -> None:
    assert DEFAULT_MODEL in appliance("models", "list", data_dir=data_dir).stdout
    assert appliance("models", "verify", data_dir=data_dir).returncode == 0
    [blob] = (data_dir / "models").glob("sha256-*")
    blob.unlink()  # the template's blob is hard-linked: replace the link, never write through it
    blob.write_bytes(b"GGUF" + b"\0" * 64)
    damaged = appliance("models", "verify", data_dir=data_dir, check=False)
    assert damaged.returncode != 0
    assert DEFAULT_MODEL in damaged.stderr
    appliance("models", "rm", DEFAULT_MODEL, data_dir=data_dir)
    assert appliance("models", "list", data_dir=data_dir).stdout.startswith("no models")
    assert not list((data_dir / "models").glob("sha256-*"))


def test_importing_a_non_gguf_file_is_refused_and_stores_nothing(data_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "notes.gguf"
    junk.write_text("this is not a model")
    result = appliance("models", "pull", f"file:{junk}", data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert "not a GGUF" in result.stderr
    assert [p.name for p in (data_dir / "tmp").iterdir()] == []
    assert "notes" not in appliance("models", "list", data_dir=data_dir).stdout


def test_keys_create_prints_the_key_alone_on_the_last_line(data_dir: Path) -> None:
    out = appliance("keys", "create", "--name", "ci", "--role", "admin", "--expires", "30d", data_dir=data_dir)
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("apl_") and " " not in key
    listing = appliance("keys", "list", data_dir=data_dir).stdout
    assert "ci" in listing and key not in listing
    assert key not in (data_dir / "appliance.db").read_bytes().decode("latin-1")


def test_unknown_role_is_refused(data_dir: Path) -> None:
    result = appliance("keys", "create", "--name", "x", "--role", "wizard", data_dir=data_dir, check=False)
    assert result.returncode == 1 and "unknown role" in result.stderr


def test_revoked_and_expired_keys_are_refused(start_server: Callable[..., Running]) -> None:
    running = start_server()
    assert running.process is not None
    data = running.process.data_dir
    assert httpx.get(running.url + "/v1/models", headers=running.headers).status_code == 200
    key_id = running.key[4:12]
    appliance("keys", "revoke", key_id, data_dir=data)
    assert httpx.get(running.url + "/v1/models", headers=running.headers).status_code == 401
    short = new_key(data, expires="3s")
    with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {short}"}) as client:
        first = client.get("/v1/models").status_code
        deadline_passed = _wait_for_expiry(client)
    assert first == 200 and deadline_passed


def _wait_for_expiry(client: httpx.Client) -> bool:
    """Poll until the 3-second key is refused (at most a few seconds more)."""
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if client.get("/v1/models").status_code == 401:
            return True
        time.sleep(0.2)
    return False


def test_doctor_reports_hardware_and_engine_choice(data_dir: Path) -> None:
    out = appliance("doctor", data_dir=data_dir).stdout
    assert "CPU:" in out and "memory:" in out and "disk:" in out and "GPU:" in out
    assert f"{DEFAULT_MODEL} (default)" in out and "llamacpp" in out


def test_doctor_names_what_to_fix(tmp_path: Path) -> None:
    result = appliance("doctor", data_dir=tmp_path / "missing", check=False)
    assert result.returncode == 1
    assert "appliance init" in result.stdout


def test_serve_on_a_busy_port_fails_fast_with_one_clear_line(data_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = appliance("serve", "--port", str(port), data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "APPLIANCE_SERVER__PORT" in result.stderr
    assert "worker.spawn" not in result.stderr, "no model worker may start when the port is unusable"
