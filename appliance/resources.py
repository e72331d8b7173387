"""Files shipped beside the package (models/catalog.toml, policies/*.toml): in a source checkout they sit at
its root; a system install copies them to <prefix>/share/ next to its virtual environment (/opt/appliance)."""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def shipped(relative: str) -> Path:
    """The shipped file `relative` (e.g. "policies/rbac.toml"); the checkout's copy when both exist."""
    candidates = (CHECKOUT / relative, Path(sys.prefix).parent / "share" / relative)
    return next((c for c in candidates if c.is_file()), candidates[0])
