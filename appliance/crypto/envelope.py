"""Envelope encryption: a random data key per model file, wrapped with AES-256-GCM under the active
key-encryption key, with the file's stream header and the model id as associated data.

The wrapped key lives beside the weights in its own small file, so rotating the key-encryption key rewrites
that file only and never the weights. Its layout: magic, format version, key version (4 bytes), nonce,
wrapped key with tag."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.crypto.keyring import KeyRing
from appliance.crypto.streaming import DATA_KEY_LEN, TAG_LEN, IntegrityError

MAGIC = b"APLWRAP"
FORMAT_VERSION = 1
NONCE_LEN = 12
_PREFIX = struct.Struct(f">{len(MAGIC)}sBI")
ENVELOPE_LEN = _PREFIX.size + NONCE_LEN + DATA_KEY_LEN + TAG_LEN
_AAD_LABEL = b"appliance data key v1"


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=DATA_KEY_LEN * 8)


@dataclass(frozen=True)
class Envelope:
    key_version: int
    nonce: bytes
    wrapped: bytes

    def _prefix(self) -> bytes:
        return _PREFIX.pack(MAGIC, FORMAT_VERSION, self.key_version)

    def encode(self) -> bytes:
        return self._prefix() + self.nonce + self.wrapped

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        if len(raw) != ENVELOPE_LEN:
            raise IntegrityError(f"wrapped key is {len(raw)} bytes, expected {ENVELOPE_LEN}")
        magic, version, key_version = _PREFIX.unpack(raw[: _PREFIX.size])
        if magic != MAGIC or version != FORMAT_VERSION:
            raise IntegrityError("not a wrapped data key of a known format")
        rest = raw[_PREFIX.size :]
        return cls(key_version, rest[:NONCE_LEN], rest[NONCE_LEN:])

    def aad(self, stream_header: bytes, model_id: str) -> bytes:
        return _AAD_LABEL + self._prefix() + stream_header + model_id.encode()


def wrap(ring: KeyRing, data_key: bytes, stream_header: bytes, model_id: str) -> Envelope:
    version, kek = ring.active()
    shell = Envelope(version, os.urandom(NONCE_LEN), b"")
    sealed = AESGCM(kek).encrypt(shell.nonce, data_key, shell.aad(stream_header, model_id))
    return Envelope(version, shell.nonce, sealed)


def unwrap(ring: KeyRing, envelope: Envelope, stream_header: bytes, model_id: str) -> bytes:
    kek = ring.key(envelope.key_version)
    try:
        return AESGCM(kek).decrypt(envelope.nonce, envelope.wrapped, envelope.aad(stream_header, model_id))
    except InvalidTag:
        raise IntegrityError(f"the data key does not open under key version {envelope.key_version}: the wrapped "
                             "key, the file header or the model id was changed") from None


def rewrap(ring: KeyRing, envelope: Envelope, stream_header: bytes, model_id: str) -> Envelope:
    """The same data key wrapped under the active version; the weights stay as they are."""
    return wrap(ring, unwrap(ring, envelope, stream_header, model_id), stream_header, model_id)
