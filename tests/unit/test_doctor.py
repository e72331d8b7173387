"""`appliance doctor`'s printed form of the findings that `diagnose` returns (and /api/settings serves): the facts
under their labels, then each problem with its fix on one line, exactly as the command always printed them."""

from __future__ import annotations

import pytest

from appliance.doctor import Finding, print_findings


def test_findings_print_as_the_doctor_always_did(capsys: pytest.CaptureFixture[str]) -> None:
    findings = [
        Finding("ok", "python", "appliance on Python 3.11.7 (/venv/bin/python)"),
        Finding("ok", "cpu", "x86_64, 4 physical cores, 8 logical"),
        Finding("ok", "memory", "15.5 GiB total, 9.1 GiB available"),
        Finding("ok", "disk", "1.2 GiB free at /data"),
        Finding("problem", "disk", "only 1.2 GiB free at /data", "models need room, free at least 2 GiB", "; "),
        Finding("ok", "gpu", "none (NVIDIA driver not found)"),
        Finding("ok", "data", "/data (initialised)"),
        Finding("problem", "permissions", "/data is mode 0o755, expected 0o700", "chmod 700 /data"),
        Finding("ok", "models", "m (default) (gguf, 98 MiB) -> llamacpp on CPU: GGUF on CPU: no GPU"),
        Finding("ok", "models", "h (hf, 260 MiB) -> none on -: needs vLLM"),
        Finding("problem", "models", "model 'h' cannot run here: needs vLLM"),
    ]
    assert print_findings(findings) == 1
    assert capsys.readouterr().out.splitlines() == [
        "appliance on Python 3.11.7 (/venv/bin/python)",
        "CPU:     x86_64, 4 physical cores, 8 logical",
        "memory:  15.5 GiB total, 9.1 GiB available",
        "disk:    1.2 GiB free at /data",
        "GPU:     none (NVIDIA driver not found)",
        "data:    /data (initialised)",
        "models:",
        "  m (default) (gguf, 98 MiB) -> llamacpp on CPU: GGUF on CPU: no GPU",
        "  h (hf, 260 MiB) -> none on -: needs vLLM",
        "PROBLEM: only 1.2 GiB free at /data; models need room, free at least 2 GiB",
        "PROBLEM: /data is mode 0o755, expected 0o700: chmod 700 /data",
        "PROBLEM: model 'h' cannot run here: needs vLLM",
        "3 problem(s) found",
    ]


def test_no_models_and_no_problems(capsys: pytest.CaptureFixture[str]) -> None:
    assert print_findings([Finding("ok", "crypto", "encrypted"), Finding("ok", "models", "none installed")]) == 0
    assert capsys.readouterr().out.splitlines() == ["crypto:  encrypted", "models:  none installed",
                                                    "no problems found"]
