"""Canary values of every PII type, and a scan of every byte under a directory for any of them in the clear."""

from __future__ import annotations

from pathlib import Path

CANARIES: dict[str, str] = {
    "email": "zebra.canary.7731@example.org",
    "phone": "+1 415-555-0176",
    "credit_card": "4539 5786 4218 5554",
    "iban": "GB33 BUKB 2020 1555 5555 55",
    "us_ssn": "287-65-4321",
    "ip_address": "198.51.100.213",
    "secret": "AKIAZ7CANARY4PII2QWE",
}


def needles(values: dict[str, str] | list[str]) -> list[bytes]:
    """Each value as bytes, and its digits-only/compact form for the number types (so reformatting cannot hide it)."""
    out: set[bytes] = set()
    for value in (values.values() if isinstance(values, dict) else values):
        out.add(value.encode())
        compact = value.replace(" ", "").replace("-", "")
        if len(compact) >= 9:
            out.add(compact.encode())
    return sorted(out)


def scan(root: Path, values: dict[str, str] | list[str], extra_files: list[Path] | None = None) -> list[str]:
    """`path: value` for every canary found in the clear in any file under `root` (and `extra_files`)."""
    hits = []
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()] + list(extra_files or [])
    wanted = needles(values)
    for path in files:
        if path.parent.name == "models" and path.name.startswith("sha256-"):
            continue  # model weights: large, and never written by a request
        data = path.read_bytes()
        hits += [f"{path}: {n.decode()}" for n in wanted if n in data]
    return hits
