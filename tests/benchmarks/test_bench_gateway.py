"""`pytest tests/benchmarks` runs the gateway benchmark once, with few rounds; not part of the default run.

APPLIANCE_BENCH_ROUNDS (default 3), APPLIANCE_BENCH_DATA_DIR (a prepared data dir, to skip the pull) and
APPLIANCE_BENCH_ENFORCE=1 (fail when a target is missed) tune it. The script form is the real interface:
`.venv/bin/python -m tests.benchmarks.bench_gateway --help`."""

from __future__ import annotations

import os

import pytest

from tests.benchmarks import bench_gateway


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gateway_against_llama_cpp_direct(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--rounds", os.environ.get("APPLIANCE_BENCH_ROUNDS", "3"), "--warmup", "1"]
    if data_dir := os.environ.get("APPLIANCE_BENCH_DATA_DIR"):
        args += ["--data-dir", data_dir]
    if os.environ.get("APPLIANCE_BENCH_ENFORCE"):
        args.append("--enforce")
    code = bench_gateway.main(args)
    out, err = capsys.readouterr()
    with capsys.disabled():
        print("\n" + out)
    assert code == 0, f"benchmark exited {code}:\n{err[-3000:]}"
