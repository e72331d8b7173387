"""What the command modules share: the handler type, the actor of audited changes, number parsing."""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import Callable
from typing import Any

from appliance.config import LoadedSettings
from appliance.datadir import DataDir

Handler = Callable[[argparse.Namespace, LoadedSettings], int]
Add = Callable[..., argparse.ArgumentParser]
"""`add(name, handler, help, parent)`: register one subcommand and return its parser."""


def cli_actor() -> str:
    """Who did it, as the audit log records CLI actions: the operating-system user running the command."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (e.g. a container without a passwd entry)
        return f"cli:uid-{os.getuid()}"


def open_audit(data: DataDir) -> Any:
    from appliance.audit import AuditLog
    from appliance.privacy.controls import PrivacyControls

    data.require_initialised()
    audit = AuditLog(data.connect())
    PrivacyControls.build(audit.conn, audit, data.read_master_key())  # the audit surface: no PII in the clear
    return audit


def limits_text(item: Any) -> str:
    """`rpm=60 daily_tokens=1000`, or `quotas=none`."""
    return " ".join(f"{k}={getattr(item, k)}" for k in ("rpm", "tpm", "daily_tokens")
                    if getattr(item, k) is not None) or "quotas=none"


KEEP = object()  # an option of `users set-limits` not given: that limit stays as it is



def limit_or_none(text: str) -> int | None:
    """A positive whole number, or `none` for no limit."""
    if text.strip().lower() == "none":
        return None
    return positive_int(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number; leave the option out for no limit")
    return value

