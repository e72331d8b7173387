"""The watermark's secret: 32 random bytes made on first use, kept wrapped under the key ring (like a model's data
key, `appliance.crypto.envelope`) in keys/wrapped/watermark.key, and rewrapped by `appliance crypto rotate`. Each
model gets its own key from it (HKDF-SHA256 with the model's name), so a text is detected only with the model that
wrote it, and every version of a model shares the key. Losing the file (or the key ring) loses detection of all
earlier texts; a backup of the data dir keeps it."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.crypto.envelope import Envelope, rewrap, unwrap, wrap
from appliance.crypto.files import atomic_write
from appliance.crypto.keyring import KeyRing

SECRET_LEN = 32
_AAD_ID = "appliance-watermark-secret"  # the envelope's associated data in place of a model id
_INFO = b"appliance watermark key v1\0"


class WatermarkKeys:
    def __init__(self, ring: KeyRing, wrapped: Path) -> None:
        self.ring = ring
        self.path = wrapped / "watermark.key"
        self._secret: bytes | None = None

    def _envelope(self) -> Envelope | None:
        return Envelope.decode(self.path.read_bytes()) if self.path.is_file() else None

    def secret(self) -> bytes:
        """The secret, made and wrapped under the active key version the first time."""
        if self._secret is None:
            envelope = self._envelope()
            if envelope is None:
                secret = os.urandom(SECRET_LEN)
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                atomic_write(self.path, wrap(self.ring, secret, b"", _AAD_ID).encode())
                self._secret = secret
            else:
                self._secret = unwrap(self.ring, envelope, b"", _AAD_ID)
        return self._secret

    def model_key(self, model: str) -> bytes:
        """The watermark key of one model (by name, without a version)."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + model.encode()).derive(
            self.secret())

    def key_version(self) -> int | None:
        """The key ring version the secret is wrapped under; None before it exists."""
        envelope = self._envelope()
        return envelope.key_version if envelope is not None else None

    def rewrap(self) -> bool:
        """Wrap the secret under the active key version; True if it was rewritten."""
        envelope = self._envelope()
        if envelope is None or envelope.key_version == self.ring.active_version():
            return False
        atomic_write(self.path, rewrap(self.ring, envelope, b"", _AAD_ID).encode(), crash_label="rewrap")
        return True
