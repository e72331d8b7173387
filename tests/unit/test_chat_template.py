"""Chat templates: real templates render, hostile ones are refused inside the sandbox and never run code."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from appliance.engines.chat_template import CHATML, ChatTemplate, ChatTemplateError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
SANDBOX_STOPPED = "sandbox forbids and was stopped"


def cve_2024_34359(marker: Path) -> str:
    """The published llama-cpp-python template escape: find warnings.catch_warnings, reach builtins, run a shell."""
    return (
        "{% for x in ().__class__.__base__.__subclasses__() %}{% if x.__name__ == \"catch_warnings\" %}"
        "{{ x()._module.__builtins__['__import__']('os').system('touch " + str(marker) + "') }}"
        "{% endif %}{% endfor %}"
    )


def test_chatml_fallback() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback
    assert template.source == CHATML
    assert template.render(MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(MESSAGES, add_generation_prompt=False).endswith("Hi!<|im_end|>\n")


def test_template_with_bos_and_eos() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert not template.is_fallback
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "and 3+3?"}]
    assert template.render(conversation) == "<s>[INST] 2+2? [/INST]4</s>[INST] and 3+3? [/INST]"


def test_features_real_templates_use_still_work() -> None:
    # namespace assignment, loop controls, attribute-style item access, filters and strftime_now all appear in
    # templates shipped with popular models; a sandbox that refuses them would break those models
    source = (
        "{% set ns = namespace(system=false) %}{% for m in messages %}{% if m.role == 'system' %}"
        "{% set ns.system = true %}{% endif %}{% endfor %}"
        "{% if not ns.system %}{{ 'default system' }}|{% endif %}"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content | trim | upper }};"
        "{% endfor %}{{ messages | length }}|{{ strftime_now('%Y') | length }}|{{ messages[0] | tojson }}"
    )
    conversation = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    assert ChatTemplate(source).render(conversation) == (
        'default system|A;B;3|4|{"content": " a ", "role": "user"}'
    )


def test_the_cve_payload_is_live_outside_the_sandbox(tmp_path: Path) -> None:
    """A control: the same text through a plain jinja2 Environment really runs a shell command."""
    marker = tmp_path / "control"
    jinja2.Environment(autoescape=False).from_string(cve_2024_34359(marker)).render(messages=MESSAGES)
    assert marker.exists()


def test_cve_2024_34359_payload_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    template = ChatTemplate(cve_2024_34359(marker))  # parsing is harmless; rendering is what must be stopped
    with pytest.raises(ChatTemplateError, match=SANDBOX_STOPPED):
        template.render(MESSAGES)
    assert not marker.exists()


@pytest.mark.parametrize("source", [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ (messages|attr('__class__')).__base__.__subclasses__() }}",
    "{{ messages.__class__.__base__ }}",
    "{% set _ = messages.append({'role': 'system', 'content': 'injected'}) %}",
    "{% set _ = messages[0].update({'content': 'rewritten'}) %}",
    "{{ raise_exception.__globals__['ChatTemplateError'] }}",
])
def test_escape_attempts_are_refused(tmp_path: Path, source: str) -> None:
    marker = tmp_path / "MARKER"
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(ChatTemplateError, match=SANDBOX_STOPPED):
        ChatTemplate(source.replace("MARKER", str(marker))).render(messages)
    assert not marker.exists()
    assert messages == MESSAGES  # the immutable sandbox leaves the caller's conversation untouched


@pytest.mark.parametrize("source", [
    "{{ self.__init__ }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "{{ '%s' % messages.__class__ }}",
])
def test_unsafe_lookups_that_render_as_nothing_leak_nothing(source: str) -> None:
    try:
        rendered = ChatTemplate(source).render(MESSAGES)
    except ChatTemplateError:
        return
    assert "class" not in rendered and "globals" not in rendered and "function" not in rendered


def test_raise_exception_becomes_a_template_error() -> None:
    source = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('nope: first message must be user') }}"
              "{% endif %}")
    with pytest.raises(ChatTemplateError, match="nope: first message must be user"):
        ChatTemplate(source).render(MESSAGES)


@pytest.mark.parametrize(("source", "says"), [
    ("{% for %}", "does not parse"),
    ("{{ messages[0]['content'] + 1 }}", "failed"),
    ("{{ undefined_thing.attribute }}", "failed"),
    ("{{ range(10**9) | list }}", "failed"),
])
def test_broken_templates_are_template_errors(source: str, says: str) -> None:
    with pytest.raises(ChatTemplateError, match=says):
        ChatTemplate(source).render(MESSAGES)
