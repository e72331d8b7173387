"""The default model answers through the gateway with the official openai SDK."""

from __future__ import annotations

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL


def test_chat_completion_answers(server: Running) -> None:
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
