"""The segmented AEAD file format: committed known-answer vectors, an independent decryption with the bare
primitives, round trips over the sizes around a segment boundary, and every class of tampering failing closed."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.crypto.streaming import (
    HEADER_LEN,
    MIB,
    TAG_LEN,
    IntegrityError,
    StreamEncryptor,
    StreamHeader,
    decrypt_bytes,
    encrypt_bytes,
)

S = MIB
DATA_KEY = bytes(range(32))
KAT_HEADER = StreamHeader(S, bytes(range(100, 132)), bytes.fromhex("a0a1a2a3a4a5a6"))
KAT_HEADER_HEX = ("41504c5354524d01001000006465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80818283"
                  "a0a1a2a3a4a5a6")
KAT_EMPTY = KAT_HEADER_HEX + "0133dca91d2386e23c2633748d17d107"
KAT_SHORT = KAT_HEADER_HEX + "1b8dc00adfd92252e5623469e3c2966d25dac1f9d7f5bce002"
KAT_TWO_SEGMENTS_SHA256 = "835973d16e2538eafcd5f5e31ca44610cf367356d2a5ccfb0e5fa8466b0e245a"


def two_segment_payload() -> bytes:
    return (bytes(range(256)) * 4097)[: S + 1]


@pytest.mark.parametrize(("plaintext", "expected"), [(b"", KAT_EMPTY), (b"appliance", KAT_SHORT)])
def test_known_answers(plaintext: bytes, expected: str) -> None:
    assert encrypt_bytes(DATA_KEY, plaintext, KAT_HEADER).hex() == expected
    assert decrypt_bytes(DATA_KEY, bytes.fromhex(expected)) == plaintext


def test_known_answer_over_two_segments() -> None:
    blob = encrypt_bytes(DATA_KEY, two_segment_payload(), KAT_HEADER)
    assert len(blob) == HEADER_LEN + (S + TAG_LEN) + (1 + TAG_LEN)
    assert hashlib.sha256(blob).hexdigest() == KAT_TWO_SEGMENTS_SHA256
    assert decrypt_bytes(DATA_KEY, blob) == two_segment_payload()


def test_format_matches_its_description_with_the_bare_primitives() -> None:
    """HKDF-SHA256(data key, salt) as the file key; nonce = prefix || counter || last flag; AD = SHA-256(header)."""
    blob = encrypt_bytes(DATA_KEY, two_segment_payload(), KAT_HEADER)
    header = blob[:HEADER_LEN]
    assert header.hex() == KAT_HEADER_HEX
    file_key = HKDF(hashes.SHA256(), 32, KAT_HEADER.salt, b"appliance model stream v1").derive(DATA_KEY)
    aead, aad = AESGCM(file_key), hashlib.sha256(header).digest()
    first = blob[HEADER_LEN : HEADER_LEN + S + TAG_LEN]
    last = blob[HEADER_LEN + S + TAG_LEN :]
    prefix = KAT_HEADER.nonce_prefix
    assert aead.decrypt(prefix + struct.pack(">IB", 0, 0), first, aad) == two_segment_payload()[:S]
    assert aead.decrypt(prefix + struct.pack(">IB", 1, 1), last, aad) == two_segment_payload()[S:]


SIZES = [0, 1, S - 1, S, S + 1, 2 * S + 7]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_in_any_chunking(size: int) -> None:
    plaintext = os.urandom(size)
    key = os.urandom(32)
    whole = encrypt_bytes(key, plaintext)
    assert decrypt_bytes(key, whole) == plaintext
    enc = StreamEncryptor(key, StreamHeader.decode(whole[:HEADER_LEN]))
    pieces = [enc.start()]
    for start in range(0, size, 300_007):  # odd chunk sizes straddle segment boundaries
        pieces += enc.update(plaintext[start : start + 300_007])
    pieces.append(enc.finish())
    assert b"".join(pieces) == whole  # same header, same key: chunking does not change the file
    expected_segments = max(1, -(-size // S))
    assert len(whole) == HEADER_LEN + size + expected_segments * TAG_LEN


def segments(blob: bytes) -> list[bytes]:
    body = blob[HEADER_LEN:]
    return [body[i : i + S + TAG_LEN] for i in range(0, len(body), S + TAG_LEN)] or [b""]


def mutations(blob: bytes) -> dict[str, bytes]:
    """Every class of damage, each applicable to this blob (a multi-segment class only when there are several)."""
    segs, header = segments(blob), blob[:HEADER_LEN]
    out = {
        "truncate-last-byte": blob[:-1],
        "truncate-to-header": header,
        "truncate-inside-header": blob[: HEADER_LEN - 1],
        "append-one-byte": blob + b"\0",
        "append-a-tag's-worth": blob + os.urandom(TAG_LEN),
        "append-copy-of-last-segment": blob + segs[-1],
        "flip-bit-in-magic": bytes([blob[0] ^ 1]) + blob[1:],
        "flip-bit-in-salt": blob[:20] + bytes([blob[20] ^ 0x10]) + blob[21:],
        "flip-bit-in-nonce-prefix": blob[: HEADER_LEN - 1] + bytes([blob[HEADER_LEN - 1] ^ 0x80]) + blob[HEADER_LEN:],
        "flip-bit-in-tag": blob[:-1] + bytes([blob[-1] ^ 1]),
        "flip-bit-in-first-segment": blob[:HEADER_LEN] + bytes([blob[HEADER_LEN] ^ 4]) + blob[HEADER_LEN + 1 :],
        "segment-size-changed": blob[:8] + struct.pack(">I", 2 * S) + blob[12:],
        "format-version-changed": blob[:7] + b"\x02" + blob[8:],
    }
    if len(segs) >= 2:
        body = b"".join(segs)
        out["drop-last-segment"] = header + b"".join(segs[:-1])
        out["swap-first-two-segments"] = header + segs[1] + segs[0] + b"".join(segs[2:])
        out["duplicate-first-segment"] = header + segs[0] + body
        out["truncate-at-segment-boundary-plus-one"] = header + segs[0] + segs[1][:1]
        middle = HEADER_LEN + S // 2
        out["flip-bit-mid-segment"] = blob[:middle] + bytes([blob[middle] ^ 0x40]) + blob[middle + 1 :]
    return out


@pytest.mark.parametrize("size", [0, 1, S - 1, S, S + 1])
def test_every_mutation_fails_closed(size: int) -> None:
    key = os.urandom(32)
    plaintext = os.urandom(size)
    blob = encrypt_bytes(key, plaintext)
    results = {}
    for name, damaged in mutations(blob).items():
        assert damaged != blob, name
        try:
            decrypt_bytes(key, damaged)
            results[name] = "ACCEPTED"
        except IntegrityError:
            results[name] = "refused"
    assert all(r == "refused" for r in results.values()), results
    if size > S:
        assert "swap-first-two-segments" in results


def test_a_header_from_another_file_is_refused() -> None:
    key = os.urandom(32)
    a, b = encrypt_bytes(key, b"x" * 100), encrypt_bytes(key, b"x" * 100)
    with pytest.raises(IntegrityError):
        decrypt_bytes(key, b[:HEADER_LEN] + a[HEADER_LEN:])


def test_wrong_key_is_refused() -> None:
    blob = encrypt_bytes(os.urandom(32), b"weights")
    with pytest.raises(IntegrityError, match="segment 0 of 1 failed authentication"):
        decrypt_bytes(os.urandom(32), blob)


@pytest.mark.parametrize("size", [S // 2, 5 * MIB])
def test_segment_size_outside_one_to_four_mib_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="segment size"):
        StreamHeader.fresh(size)
