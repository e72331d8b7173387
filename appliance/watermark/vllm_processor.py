"""The watermark in vLLM: a logits processor (vLLM's v1 `LogitsProcessor`, loaded with `--logits-processors`) that
adds delta to the green tokens of every request's next token, as the llama.cpp worker's sampler does
(`appliance.watermark.green`), greedy requests included (it is not argmax-invariant).

It runs inside vLLM's own environment, which does not have the appliance installed: the supervisor copies this file
and green.py into a private tmpfs folder as the package `appliance_watermark` (hence the relative import), puts the
folder on the worker's PYTHONPATH and the path of a 0600 JSON file with the model's key, gamma and delta in
APPLIANCE_WATERMARK_CONFIG (`appliance.engines.vllm.watermark_plugin`). vLLM refuses custom logits processors with
speculative decoding, so a watermarked vLLM model cannot use it."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .green import GreenList

CONFIG_ENV = "APPLIANCE_WATERMARK_CONFIG"
DEVICE_MASKS = 256  # (delta on green, 0 elsewhere) rows kept on the device, by previous token


class WatermarkLogitsProcessor(LogitsProcessor):  # type: ignore[misc]
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        with open(os.environ[CONFIG_ENV], "rb") as fh:  # noqa: PTH123 (vLLM's environment: plain file access)
            config = json.load(fh)
        self.key = bytes.fromhex(config["key"])
        self.gamma = float(config["gamma"])
        self.delta = float(config["delta"])
        self.device = device
        self.green: GreenList | None = None  # made at the first batch, when the logits' width is known
        self.masks: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.requests: dict[int, tuple[list[int] | None, list[int]]] = {}  # batch row -> (prompt, live output)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        return None

    def is_argmax_invariant(self) -> bool:
        return False  # greedy requests are watermarked too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.requests, batch_update, lambda params, prompt, output: (prompt, output))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (prompt, output) in self.requests.items():
            prev = output[-1] if output else (prompt[-1] if prompt else -1)
            if prev >= 0:
                logits[row] += self._bias(prev, logits)
        return logits

    def _bias(self, prev: int, logits: torch.Tensor) -> torch.Tensor:
        found = self.masks.get(prev)
        if found is not None:
            self.masks.move_to_end(prev)
            return found
        if self.green is None:
            self.green = GreenList(self.key, int(logits.shape[-1]), self.gamma, cache=1)
        bias = torch.from_numpy(self.green.mask(prev)).to(self.device).to(logits.dtype) * self.delta
        self.masks[prev] = bias
        if len(self.masks) > DEVICE_MASKS:
            self.masks.popitem(last=False)
        return bias
