"""The data directory of DESIGN section 5: its layout, its permissions and its first-time set-up."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from appliance import db

MASTER_KEY_BYTES = 32


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def master_key(self) -> Path:
        return self.keys / "master.key"

    @property
    def wrapped_keys(self) -> Path:
        """The data key of each model blob, wrapped under a version of the key ring (keys/kek-NNNNNN.*)."""
        return self.keys / "wrapped"

    @property
    def database(self) -> Path:
        return self.root / "appliance.db"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def rag(self) -> Path:
        return self.root / "rag"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def tmp(self) -> Path:
        """Staging area for downloads and imports, on the same filesystem as models/ for atomic renames."""
        return self.root / "tmp"

    def stores(self) -> dict[str, Path]:
        """Where each store writes, by the name a full-disk error gives it (appliance.storage)."""
        return {"the database": self.database, "the vector index (Chroma)": self.rag / "chroma",
                "the keyword index": self.rag / "index.db", "the response cache": self.cache / "responses",
                "the embedding cache": self.cache / "embeddings", "the model store": self.models,
                "the staging folder": self.tmp, "the key ring": self.keys}

    def initialise(self) -> bool:
        """Create what is missing, tighten modes, migrate the database. Idempotent; True if it created keys."""
        old_umask = os.umask(0o077)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.chmod(0o700)
            for sub in (self.keys, self.wrapped_keys, self.models, self.rag, self.cache, self.run, self.tmp):
                sub.mkdir(exist_ok=True)
                sub.chmod(0o700)
            created = False
            if not self.master_key.exists():
                fd = os.open(self.master_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(secrets.token_bytes(MASTER_KEY_BYTES))
                created = True
            self.master_key.chmod(0o600)
            with contextlib.closing(self.connect()):
                pass
            if self.database.exists():
                self.database.chmod(0o600)
            return created
        finally:
            os.umask(old_umask)

    def require_initialised(self) -> None:
        if not self.master_key.is_file() or not self.database.is_file():
            raise FileNotFoundError(
                f"{self.root} is not an initialised data directory; run `appliance init --data-dir {self.root}`"
            )

    def read_master_key(self) -> bytes:
        key = self.master_key.read_bytes()
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(f"{self.master_key} is damaged ({len(key)} bytes, expected {MASTER_KEY_BYTES})")
        return key

    def connect(self) -> sqlite3.Connection:
        """A connection to the database at the current schema: an upgraded appliance migrates in place."""
        conn = db.connect(self.database)
        db.migrate(conn)
        return conn
