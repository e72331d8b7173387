"""Secrets the appliance must send to other services (an upstream's API key, the OpenID client secret): one 0600
file per secret in a 0700 folder under the data dir's `keys/`, written atomically, never logged or shown."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.errors import InvalidRequest


class SecretFiles:
    """`save`, `load` and `delete` a named secret in `folder` (`<name>.key`)."""

    def __init__(self, folder: Path, what: str = "secret") -> None:
        self.folder = folder
        self.what = what

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise InvalidRequest(f"{name!r} is not a valid name", param="name")
        return self.folder / f"{name}.key"

    def save(self, name: str, secret: str) -> None:
        self.save_lines(name, [secret])

    def save_lines(self, name: str, secrets: list[str]) -> None:
        """Several secrets under one name, a line each (e.g. one API key per upstream of a remote model)."""
        secrets = [s.strip() for s in secrets]
        if not secrets or any(not s or any(c.isspace() for c in s) for s in secrets):
            raise InvalidRequest(f"the {self.what} is empty or contains spaces", param="api_key")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(secrets))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)

    def load(self, name: str) -> str | None:
        """The secret (the first, where there are several)."""
        return next(iter(self.load_lines(name)), None)

    def load_lines(self, name: str) -> list[str]:
        path = self._path(name)
        return path.read_text().split() if path.is_file() else []

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
