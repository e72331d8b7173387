"""The `remote` engine against a real upstream: a second real appliance (llama.cpp and the default model) behind
the first one's gateway, with the upstream's key kept secret."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance


def add_remote(front: Running, name: str, upstream: Running, key: str, upstream_model: str = DEFAULT_MODEL) -> str:
    assert front.process is not None
    return appliance("models", "add-remote", name, "--url", upstream.url + "/v1", "--upstream-model", upstream_model,
                     "--api-key-stdin", data_dir=front.process.data_dir, input=key + "\n").stdout


@pytest.fixture(scope="module")
def front(start_server: Callable[..., Running]) -> Running:
    return start_server()


def test_chat_through_a_remote_upstream(front: Running, server: Running) -> None:
    out = add_remote(front, "upstream-smol", server, server.key)
    assert "with an API key" in out and server.key not in out
    assert front.process is not None
    key_file = front.process.data_dir / "keys" / "remote" / "upstream-smol.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    client = front.client()
    reply = client.chat.completions.create(model="upstream-smol", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0

    stream = client.chat.completions.create(model="upstream-smol", messages=[{"role": "user", "content": "Count"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    listed = appliance("models", "list", data_dir=front.process.data_dir).stdout
    assert "upstream-smol\tremote" in listed and server.key not in listed
    doctor = appliance("doctor", data_dir=front.process.data_dir, check=False).stdout
    assert "upstream-smol (remote 'smollm2-135m-instruct' at " in doctor and "-> remote on upstream" in doctor
    assert server.key not in doctor
    assert server.key not in front.process.log_path.read_text()  # the secret is never logged


def test_a_refused_key_is_a_clear_503(front: Running, server: Running) -> None:
    add_remote(front, "upstream-badkey", server, "sk-not-a-real-key")
    with pytest.raises(openai.APIStatusError) as caught:
        front.client().chat.completions.create(model="upstream-badkey", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
    assert caught.value.status_code == 503
    assert "the API key was refused" in str(caught.value)


def test_an_unknown_upstream_model_says_what_is_there(front: Running, server: Running) -> None:
    add_remote(front, "upstream-missing", server, server.key, upstream_model="no-such-model")
    with pytest.raises(openai.APIStatusError) as caught:
        front.client().chat.completions.create(model="upstream-missing", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=4)
    assert caught.value.status_code == 503
    assert "no model 'no-such-model'" in str(caught.value) and DEFAULT_MODEL in str(caught.value)


def test_removing_a_remote_model_deletes_its_key(front: Running, server: Running) -> None:
    add_remote(front, "upstream-gone", server, server.key)
    assert front.process is not None
    key_file: Path = front.process.data_dir / "keys" / "remote" / "upstream-gone.key"
    assert key_file.exists()
    appliance("models", "rm", "upstream-gone", data_dir=front.process.data_dir)
    assert not key_file.exists()
    with pytest.raises(openai.NotFoundError):
        front.client().chat.completions.create(model="upstream-gone", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=4)
