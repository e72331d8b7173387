"""A crafted GGUF whose chat template tries to run code (the CVE-2024-34359 class) through the real server.

The crafted file is the real default model with only `tokenizer.chat_template` replaced, so everything else
about it loads and generates; only rendering its template must be refused, and nothing may run."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import jinja2
import openai
import psutil
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def cve_payload(marker: Path) -> str:
    """The published escape: reach os through warnings.catch_warnings' module builtins, then run a shell."""
    return (
        "{% for x in ().__class__.__base__.__subclasses__() %}{% if x.__name__ == \"catch_warnings\" %}"
        "{{ x()._module.__builtins__['__import__']('os').system('touch " + str(marker) + "') }}"
        "{% endif %}{% endfor %}"
        "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    )


def chat_template_of(path: Path) -> str:
    reader = gguf.GGUFReader(path, "r")
    value = reader.fields[CHAT_TEMPLATE_KEY].contents()
    assert isinstance(value, str)
    return value


def craft_gguf(model_file: Path, target: Path, template: str) -> Path:
    """Copy the model with a new chat template, using gguf's own `gguf-new-metadata` tool."""
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(model_file), str(target),
                    "--chat-template", template, "--force"], check=True, capture_output=True, timeout=300)
    return target


def worker_pid(running: Running, model: str) -> int:
    assert running.process is not None
    pids = [p.pid for p in running.process.workers()  # workers serve a version: NAME@N
            if re.search(rf"--name {re.escape(model)}(@\d+)? ", " ".join(p.cmdline()) + " ")]
    assert len(pids) == 1, pids
    return pids[0]


@pytest.mark.slow
def test_crafted_gguf_template_cannot_run_code(start_server: Callable[..., Running], model_file: Path,
                                               tmp_path: Path) -> None:
    marker = tmp_path / "pwned-by-template"
    evil = craft_gguf(model_file, tmp_path / "evil.gguf", cve_payload(marker))
    template = chat_template_of(evil)
    assert template == cve_payload(marker)
    assert chat_template_of(model_file) != template

    # Control: the template carried by the crafted file really runs a command when rendered without a sandbox.
    control = tmp_path / "control-marker"
    jinja2.Environment().from_string(template.replace(str(marker), str(control))).render(messages=MESSAGES)
    assert control.exists()
    assert not marker.exists()

    running = start_server()
    assert running.process is not None
    appliance("models", "pull", f"file:{evil}", "--name", "evil", data_dir=running.process.data_dir)
    client = running.client()

    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="evil", messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    error = info.value
    assert error.status_code == 422
    assert error.code == "chat_template_error"
    assert isinstance(error.body, dict)
    assert "sandbox forbids and was stopped" in error.body["message"]
    assert not marker.exists()

    # Streaming takes the same path: refused before the first byte, as an HTTP error rather than an SSE event.
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="evil", messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
                                       stream=True)
    assert info.value.code == "chat_template_error"
    assert not marker.exists()

    # The refusal is not a crash: the same worker process goes on serving the model without its template.
    pid = worker_pid(running, "evil")
    completion = client.completions.create(model="evil", prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    assert worker_pid(running, "evil") == pid
    assert psutil.Process(pid).is_running()

    # The default model, with its own genuine template, still chats.
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    assert not marker.exists()
