"""The effective configuration for the admin API (`GET /api/settings`): every setting the server runs with, where
its value came from and what it does (what `appliance config show` prints, secrets never shown), and the doctor's
findings, computed in a thread and kept for `DOCTOR_SECONDS` (the GPU and vLLM probes take a while)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.config import LoadedSettings, public_value, source_kind
from appliance.doctor import Finding
from appliance.observability.refresh import Refreshed

DOCTOR_SECONDS = 30.0


class SettingsReport:
    def __init__(self, loaded: LoadedSettings, doctor: Callable[[], list[Finding]],
                 doctor_seconds: float = DOCTOR_SECONDS) -> None:
        self.loaded = loaded
        self.findings = Refreshed(doctor, doctor_seconds)

    def settings(self) -> list[dict[str, Any]]:
        return [{"name": info.key, "value": public_value(info.key, info.value), "source": source_kind(info.source),
                 "origin": info.source, "help": info.help} for info in self.loaded.describe()]

    async def report(self) -> dict[str, Any]:
        findings = await self.findings.get()
        config_file = self.loaded.config_file
        return {"settings": self.settings(), "config_file": str(config_file) if config_file else None,
                "doctor": {"findings": [{"level": f.level, "topic": f.topic, "message": f.message, "fix": f.fix}
                                        for f in findings]}}
