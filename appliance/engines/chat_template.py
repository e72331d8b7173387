"""Chat templates from model files, rendered in jinja2's immutable sandbox.

A GGUF carries its template as text written by whoever made the file; rendering it with a plain
jinja2 Environment lets that text run code in our process (CVE-2024-34359). The sandbox refuses
attribute access to internals and any call that is not explicitly safe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(Exception):
    """The model's chat template failed or tried something the sandbox forbids."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML
        self.is_fallback = source is None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt; `tools` (OpenAI's chat shape) only for templates that render tools themselves."""
        extra = {"tools": list(tools)} if tools else {}
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except SecurityError as exc:
            raise ChatTemplateError(
                "the model's chat template tried an operation the sandbox forbids and was stopped; "
                "this model file is unsafe, replace it or use /v1/completions"
            ) from exc
        except ChatTemplateError:
            raise
        except Exception as exc:  # a broken template is the model's fault, never a crash of the worker
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
