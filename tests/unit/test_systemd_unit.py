"""The service's sandbox: `systemd-analyze security` rates systemd/appliance.service at most 2.0, with and
without the NVIDIA drop-in that install.sh writes on a GPU box."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "appliance.service"
INSTALL_SH = ROOT / "install.sh"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def exposure(*args: str) -> tuple[float, str]:
    """The overall exposure level that `systemd-analyze security --offline=true` gives, and its whole report."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", *args],
        capture_output=True, text=True, check=False, timeout=60,
    )
    report = done.stdout + done.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", report)
    assert found, f"no exposure level in systemd-analyze's output (exit {done.returncode}):\n{report}"
    return float(found.group(1)), report


def installed_root(tmp_path: Path) -> Path:
    """A root folder with the unit where install.sh puts it."""
    units = tmp_path / "root" / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / "appliance.service")
    return tmp_path / "root"


def test_unit_scores_at_most_two() -> None:
    level, report = exposure(str(UNIT))
    assert level <= MAX_EXPOSURE, f"appliance.service is rated {level} (> {MAX_EXPOSURE}):\n{report}"


def test_unit_settings_the_workers_need_stay_open() -> None:
    """What llama.cpp, torch and vLLM need: W+X memory for JITs, Unix and Internet sockets, /dev/shm."""
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert "MemoryDenyWriteExecute" not in settings
    assert set(settings["RestrictAddressFamilies"].split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert settings["PrivateDevices"] == "yes"  # keeps /dev/shm, where the model store decrypts
    assert settings["ReadWritePaths"] == "/var/lib/appliance"
    assert settings["CapabilityBoundingSet"] == ""


def test_gpu_dropin_lets_each_nvidia_node_in_and_keeps_the_score(tmp_path: Path) -> None:
    root = installed_root(tmp_path)
    unit = root / "etc" / "systemd" / "system" / "appliance.service"
    dev = tmp_path / "dev"
    (dev / "nvidia-caps").mkdir(parents=True)
    nodes = [dev / "nvidia0", dev / "nvidiactl", dev / "nvidia-uvm", dev / "nvidia-caps" / "nvidia-cap1"]
    for node in nodes:
        node.symlink_to("/dev/null")  # a character device, as the real nodes are
    (dev / "nvidia-not-a-device").write_text("")
    script = (
        f'eval "$(sed -n "/^write_gpu_dropin()/,/^}}/p" {INSTALL_SH})"; step() {{ :; }}; '
        f"SYS_UNIT={unit}; write_gpu_dropin {dev}"
    )
    subprocess.run(["bash", "-c", script], check=True, timeout=60)
    dropin = (unit.parent / "appliance.service.d" / "50-gpu.conf").read_text()
    for node in nodes:
        assert f"DeviceAllow={node} rw\n" in dropin
        assert f"BindPaths=-{node}\n" in dropin
    assert "nvidia-not-a-device" not in dropin
    # systemd accepts only paths under /dev in DeviceAllow=: analyse the drop-in as it reads on a real box.
    (unit.parent / "appliance.service.d" / "50-gpu.conf").write_text(dropin.replace(str(dev), "/dev"))
    level, report = exposure(f"--root={root}", "appliance.service")
    assert "/dev/nvidia0:rw" in report, report  # systemd read the drop-in
    assert "ignoring" not in report, report
    assert level <= MAX_EXPOSURE, report


def test_no_gpu_means_no_dropin(tmp_path: Path) -> None:
    root = installed_root(tmp_path)
    unit = root / "etc" / "systemd" / "system" / "appliance.service"
    stale = unit.parent / "appliance.service.d" / "50-gpu.conf"
    stale.parent.mkdir()
    stale.write_text("[Service]\nDeviceAllow=/dev/nvidia0 rw\n")
    (tmp_path / "dev").mkdir()
    script = (
        f'eval "$(sed -n "/^write_gpu_dropin()/,/^}}/p" {INSTALL_SH})"; step() {{ :; }}; '
        f"SYS_UNIT={unit}; write_gpu_dropin {tmp_path / 'dev'}"
    )
    subprocess.run(["bash", "-c", script], check=True, timeout=60)
    assert not stale.exists()
