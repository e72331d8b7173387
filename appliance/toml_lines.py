"""Where in a TOML document something is wrong, so that errors about policy files (privacy.toml, rbac.toml) name
the line to fix: the line of a key path, of a value, of a syntax error, and of a msgspec validation error."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence

import msgspec

_SYNTAX_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_MSGSPEC_PATH = re.compile(r"\s*-\s*at `\$\.?([^`]*)`")


class LocatedError(ValueError):
    """A policy document that cannot be used. The message names the file and, where known, the line; `reason` is
    what is wrong without the file's name, `line` the 1-based line to fix (None when it cannot be told)."""

    def __init__(self, message: str, *, line: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.reason = message if reason is None else reason


def locate(text: str, path: Sequence[str]) -> int | None:
    """The 1-based line of `path` (e.g. ['surfaces', 'prompt', 'emial']; '*' stands for any key) in a TOML
    document: the line of the key itself, else of the nearest table or key above it. Good enough for errors."""
    target = list(path)
    table: list[str] = []
    best: tuple[int, int] | None = None  # (matched length, line)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith(("'", '"')) else raw.strip()
        header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?$", line)
        if header:
            table = [p.strip().strip("\"'") for p in header.group(1).split(".")]
            full = table
        else:
            key = re.match(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=", line)
            if not key:
                continue
            full = table + [p.strip().strip("\"'") for p in key.group(1).split(".")]
        matched = 0
        while matched < min(len(full), len(target)) and target[matched] in (full[matched], "*"):
            matched += 1
        if matched == len(full) and matched and (best is None or matched > best[0]):
            best = (matched, number)
        if matched == len(full) == len(target):
            return number
    return best[1] if best else None


def locate_value(text: str, path: Sequence[str], value: str) -> int | None:
    """The line of the string `value` in the (possibly multi-line) array at `path`, else the line of `path`."""
    start = locate(text, path)
    if start is None:
        return None
    quoted = (f'"{value}"', f"'{value}'")
    for number, raw in enumerate(text.splitlines()[start - 1 :], start=start):
        if any(q in raw.split("#", 1)[0] for q in quoted):
            return number
        if number > start and re.match(r"^\s*(\[|[A-Za-z0-9_\-\"']+\s*=)", raw):  # the next key or table: not there
            break
    return start


def syntax_error_line(exc: tomllib.TOMLDecodeError, text: str) -> int | None:
    """The line a TOML syntax error is on (tomllib says it in the message before Python 3.14)."""
    lineno = getattr(exc, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    if match := _SYNTAX_LINE.search(str(exc)):
        return int(match.group(1))
    if "at end of document" in str(exc):
        return max(1, len(text.splitlines()))
    return None


def validation_error_path(exc: msgspec.ValidationError) -> tuple[list[str], str]:
    """The key path a msgspec validation error is about (an unknown field's own name last; '*' for a table key
    msgspec does not name), and its message without msgspec's `- at $...` suffix."""
    match = _MSGSPEC_PATH.search(str(exc))
    message = _MSGSPEC_PATH.sub("", str(exc))
    dotted = (match.group(1) if match else "").replace("[...]", ".*")
    path = [p for p in re.split(r"[.\[\]]+", dotted) if p]
    unknown = re.search(r"unknown field `([^`]+)`", message)
    return ([*path, unknown.group(1)] if unknown else path), message
