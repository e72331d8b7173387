"""Memory fit through the real server and the real llama.cpp worker: an operator's budget
(models.memory_limit_bytes) that holds one copy of the default model, not two."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance, wait_until

# one sequence of the default model needs ~372 MiB (the KV cache grows with llamacpp.parallel)
BUDGET = {"APPLIANCE_MODELS__MEMORY_LIMIT_BYTES": str(600 << 20), "APPLIANCE_LLAMACPP__PARALLEL": "1"}
LOCAL_COPY = Path("/tmp/smol.gguf")


def add_second_model(server: Running) -> None:
    """The default model again under another name: a second model of the same size."""
    assert server.process is not None
    source = f"file:{LOCAL_COPY}" if LOCAL_COPY.is_file() else DEFAULT_MODEL
    appliance("models", "pull", source, "--name", "second", data_dir=server.process.data_dir)


def chat(server: Running, model: str, **extra: object) -> str:
    reply = server.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=4, extra_body=extra or None)
    return reply.choices[0].message.content or ""




def test_a_model_that_does_not_fit_is_refused_with_the_numbers(start_server: Callable[..., Running]) -> None:
    server = start_server(BUDGET)  # the pinned default takes ~372 MiB of the 600
    add_second_model(server)
    with pytest.raises(openai.InternalServerError) as info:
        chat(server, "second")
    assert info.value.status_code == 503
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "insufficient_memory"
    message = error["message"]
    assert re.search(r"model 'second(@\w+)?' needs 3\d\d MiB of memory \(weights 9\d MiB, KV cache 18\d MiB", message)
    assert re.search(r"but \d+ MiB is free \(models.memory_limit_bytes = 600 MiB\)", message)
    assert re.search(rf"unload '{DEFAULT_MODEL}(@\w+)?'", message)
    assert chat(server, DEFAULT_MODEL) is not None  # the loaded model still serves


def test_an_idle_model_is_unloaded_to_make_room_and_keep_alive_zero_unloads(
    start_server: Callable[..., Running]
) -> None:
    server = start_server({**BUDGET, "APPLIANCE_MODELS__PIN_DEFAULT": "false"})
    assert server.process is not None
    add_second_model(server)
    (default_worker,) = server.process.workers()
    chat(server, "second")  # the default is idle and not pinned: it makes room
    wait_until(lambda: not default_worker.is_running(), "the default model's worker to stop")
    assert len(server.process.workers()) == 1
    chat(server, "second", keep_alive=0)  # Ollama's: unload once this request is done
    wait_until(lambda: server.process is not None and server.process.workers() == [], "no workers")
