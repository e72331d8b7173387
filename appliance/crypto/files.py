"""Crash-safe small-file writes (temp file, fsync, rename, fsync directory) and the crash-test hook."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import tempfile
from pathlib import Path

CRASH_ENV = "APPLIANCE_CRYPTO_CRASH_AT"
"""Test hook: `POINT:N` makes this process SIGKILL itself the Nth time it reaches POINT (see crash_point)."""
_hits: collections.Counter[str] = collections.Counter()


def crash_point(name: str) -> None:
    """Die like a power cut here when the crash-test hook names this point; a no-op otherwise."""
    wanted = os.environ.get(CRASH_ENV, "")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == int(count or "1"):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, crash_label: str = "", mode: int = 0o600) -> None:
    """Replace `path` with `data` (file mode `mode`) so that a crash leaves either the old or the new content."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode != 0o600:  # mkstemp's own mode
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if crash_label:
            crash_point(f"{crash_label}-tmp")
        tmp.replace(path)
        fsync_dir(path.parent)
        if crash_label:
            crash_point(f"{crash_label}-done")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_temps(directory: Path) -> None:
    """Temp files a crash left behind (never the real files, which have no leading dot)."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
