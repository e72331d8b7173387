"""Safe imports through the real CLI: `https:` and `hf:` (the Hub client pointed at a local stand-in through
HF_ENDPOINT, never the real hub), crafted GGUF files refused before anything is stored, unsafe names refused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import appliance
from tests.standin_http import StandIn
from tests.unit.ggufs import make_gguf, patch, tensor_field_position

ALLOW_LAN = {"APPLIANCE_MODELS__ALLOW_PRIVATE_SOURCES": "true"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    appliance("init", data_dir=data)
    return data


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


def hub_env(standin: StandIn, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": standin.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": "", **extra}


def stored(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "models").iterdir() if p.is_file()]


def models(data_dir: Path) -> str:
    return appliance("models", "list", data_dir=data_dir).stdout


def test_https_mirror_needs_the_setting_and_then_imports_with_progress(
    data_dir: Path, standin: StandIn, tmp_path: Path
) -> None:
    body = make_gguf(tmp_path / "tiny.gguf", payload_bytes=1 << 20).read_bytes()
    url = standin.file("/models/tiny.gguf", body)
    refused = appliance("models", "pull", url, data_dir=data_dir, check=False)
    assert refused.returncode == 1 and "plain http:// sources are refused" in refused.stderr
    https = appliance("models", "pull", url.replace("http:", "https:"), data_dir=data_dir, check=False)
    assert https.returncode == 1 and "loopback, private or reserved address" in https.stderr
    assert standin.seen == [] and stored(data_dir) == []

    pulled = appliance("models", "pull", url, "--name", "tiny", data_dir=data_dir, env=ALLOW_LAN)
    assert hashlib.sha256(body).hexdigest() in pulled.stdout
    assert "download tiny.gguf" in pulled.stderr  # the progress bar
    assert models(data_dir).startswith("tiny\tgguf")


def test_crafted_gguf_is_refused_at_import_and_nothing_is_stored(
    data_dir: Path, standin: StandIn, tmp_path: Path
) -> None:
    path = make_gguf(tmp_path / "crafted.gguf")
    patch(path, tensor_field_position(path, 1, -1), "<Q", 1 << 40)  # the tensor's data offset: far beyond the end
    for source in (f"file:{path}", standin.file("/crafted.gguf", path.read_bytes())):
        result = appliance("models", "pull", source, data_dir=data_dir, env=ALLOW_LAN, check=False)
        assert result.returncode == 1
        assert "tensor 'token_embd.weight' lies outside the file" in result.stderr
    assert stored(data_dir) == [] and "no models" in models(data_dir)
    assert list((data_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b"])
def test_unsafe_names_are_refused(data_dir: Path, tmp_path: Path, name: str) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    result = appliance("models", "pull", f"file:{path}", "--name", name, data_dir=data_dir, check=False)
    assert result.returncode == 1 and "not a valid model name" in result.stderr
    assert stored(data_dir) == []


def test_pickle_files_are_refused(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04" + b"\x00" * 64)
    result = appliance("models", "pull", f"file:{path}", data_dir=data_dir, check=False)
    assert result.returncode == 1 and "pickle-based formats" in result.stderr


def test_hf_pull_through_huggingface_hub_verifies_the_digest(
    data_dir: Path, standin: StandIn, tmp_path: Path
) -> None:
    body = make_gguf(tmp_path / "m.gguf").read_bytes()
    standin.hub_file("acme/tiny-GGUF", "tiny.Q4_0.gguf", body)
    standin.hub_file("acme/tiny-GGUF", "README.md", b"# tiny", lfs=False)
    env = hub_env(standin, tmp_path)
    refused = appliance("models", "pull", "hf:acme/tiny-GGUF/tiny.Q4_0.gguf", data_dir=data_dir, env=env, check=False)
    assert refused.returncode == 1 and "allow_private_sources" in refused.stderr

    env.update(ALLOW_LAN)
    pulled = appliance("models", "pull", "hf:acme/tiny-GGUF", data_dir=data_dir, env=env)  # the repo's one GGUF
    assert hashlib.sha256(body).hexdigest() in pulled.stdout
    assert models(data_dir).startswith("tiny-gguf\tgguf")  # named after the repository
    assert any(s.method == "GET" for s in standin.requests_to("/acme/tiny-GGUF/resolve/main/tiny.Q4_0.gguf"))

    # the hub publishes one digest, the download brings other bytes: refused, nothing replaced
    other = make_gguf(tmp_path / "other.gguf").read_bytes()
    standin.hub_file("acme/tiny-GGUF", "tiny.Q4_0.gguf", body)
    standin.routes["/acme/tiny-GGUF/resolve/main/tiny.Q4_0.gguf"].body = other
    mismatch = appliance("models", "pull", "hf:acme/tiny-GGUF/tiny.Q4_0.gguf", "--name", "other", data_dir=data_dir,
                         env=env, check=False)
    assert mismatch.returncode == 1 and "expected " + hashlib.sha256(body).hexdigest() in mismatch.stderr
    assert len(stored(data_dir)) == 1


def test_hf_folder_with_remote_code_is_refused(data_dir: Path, standin: StandIn, tmp_path: Path) -> None:
    config = {"architectures": ["Custom"], "auto_map": {"AutoModelForCausalLM": "modeling_custom.Custom"}}
    standin.hub_file("acme/custom", "config.json", json.dumps(config).encode(), lfs=False)
    standin.hub_file("acme/custom", "model.safetensors", b"\x00" * 64)
    result = appliance("models", "pull", "hf:acme/custom", data_dir=data_dir,
                       env=hub_env(standin, tmp_path, **ALLOW_LAN), check=False)
    assert result.returncode == 1 and "trust_remote_code/auto_map" in result.stderr
    assert stored(data_dir) == []


def test_hf_repository_with_several_gguf_files_asks_for_one(data_dir: Path, standin: StandIn, tmp_path: Path) -> None:
    for quant in ("Q4_0", "Q8_0"):
        standin.hub_file("acme/multi", f"m.{quant}.gguf", make_gguf(tmp_path / f"{quant}.gguf").read_bytes())
    result = appliance("models", "pull", "hf:acme/multi", data_dir=data_dir,
                       env=hub_env(standin, tmp_path, **ALLOW_LAN), check=False)
    assert result.returncode == 1 and "has 2 GGUF files" in result.stderr and "hf:acme/multi/FILE" in result.stderr
