"""GPU paths: run on a box with an NVIDIA GPU, skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.engines.llamacpp import gpu_offload_supported
from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance, clone_data_dir

pytestmark = pytest.mark.gpu


def test_doctor_sees_the_gpu_and_routes_gguf_to_it(template_dir: Path, tmp_path: Path) -> None:
    out = appliance("doctor", data_dir=clone_data_dir(template_dir, tmp_path / "d")).stdout
    assert "none (NVIDIA driver not found)" not in out
    if gpu_offload_supported():
        assert f"{DEFAULT_MODEL} (default)" in out and "llamacpp on GPU" in out


def test_default_model_serves_with_full_offload(server: Running) -> None:
    if not gpu_offload_supported():
        pytest.skip("llama.cpp was built without GPU offload; reinstall with CMAKE_ARGS=-DGGML_CUDA=on")
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None
