"""API keys against a real SQLite database: format, authentication, every way to be refused, no stored secret."""

from __future__ import annotations

import secrets
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from appliance.auth import keys
from appliance.auth.keys import KEY_RE, ApiKeyService, Principal, derive_pepper, parse_duration
from appliance.datadir import DataDir
from appliance.errors import InvalidRequest, Unauthenticated


@pytest.fixture
def service(data: DataDir, conn: sqlite3.Connection) -> ApiKeyService:
    return ApiKeyService(conn, derive_pepper(data.read_master_key()))


def bearer(key: str) -> str:
    return f"Bearer {key}"


def with_checksum(key_id: str, secret_part: str) -> str:
    """A well-formed key (valid checksum) for an id and secret of our choosing."""
    body = key_id + secret_part
    return keys.PREFIX + body + keys._checksum(body)


def parts(key: str) -> tuple[str, str, str]:
    match = KEY_RE.match(key)
    assert match is not None, key
    return match.group(1), match.group(2), match.group(3)


def test_created_key_has_the_documented_format(service: ApiKeyService) -> None:
    record, key = service.create("ci", "admin")
    assert key.startswith("apl_")
    key_id, secret_part, checksum = parts(key)
    assert key_id == record.id
    assert len(secret_part) == keys.SECRET_LEN
    assert checksum == keys._checksum(key_id + secret_part)
    assert record.name == "ci" and record.role == "admin"
    assert record.expires_at is None and record.revoked_at is None
    assert service.create("ci", "admin")[1] != key


def test_authenticate_returns_the_principal_and_notes_last_use(service: ApiKeyService) -> None:
    record, key = service.create("ci", "admin")
    assert service.authenticate(bearer(key)) == Principal(record.id, "ci", "admin")
    assert service.get(record.id).last_used_at is not None


def test_key_with_future_expiry_is_accepted(service: ApiKeyService) -> None:
    record, key = service.create("short", "admin", timedelta(hours=1))
    assert record.expires_at is not None
    assert datetime.fromisoformat(record.expires_at) > datetime.now(UTC)
    assert service.authenticate(bearer(key)).key_id == record.id


def flip(text: str, index: int) -> str:
    replacement = "A" if text[index] != "A" else "B"
    return text[:index] + replacement + text[index + 1 :]


def refused_headers(key: str, other_key: str) -> dict[str, str | None]:
    key_id, secret_part, _ = parts(key)
    altered_secret = flip(secret_part, 5)
    return {
        "missing header": None,
        "empty header": "",
        "basic auth": f"Basic {key}",
        "lowercase bearer": f"bearer {key}",
        "bearer without key": "Bearer ",
        "bare key without scheme": key,
        "checksum flipped": bearer(flip(key, len(key) - 1)),
        "secret char flipped": bearer(flip(key, len(keys.PREFIX) + keys.ID_LEN + 3)),
        "unknown id, valid checksum": bearer(with_checksum("Zz" * (keys.ID_LEN // 2), secret_part)),
        "altered secret, valid checksum": bearer(with_checksum(key_id, altered_secret)),
        "other key's id with this secret": bearer(with_checksum(parts(other_key)[0], secret_part)),
        "truncated": bearer(key[:-1]),
        "extra character": bearer(key + "x"),
        "wrong prefix": bearer("apk_" + key[len(keys.PREFIX) :]),
        "sql injection": "Bearer ' OR 1=1 --",
        "sql injection in id": bearer(keys.PREFIX + "' OR 1=1 --" + secret_part),
    }


def test_refuses_every_wrong_credential(service: ApiKeyService) -> None:
    _, key = service.create("ci", "admin")
    _, other_key = service.create("other", "admin")
    for what, header in refused_headers(key, other_key).items():
        with pytest.raises(Unauthenticated) as info:
            service.authenticate(header)
        assert info.value.status_code == 401, what
        # every failure reads the same: nothing tells a prober which part was wrong
        assert info.value.message.startswith("Incorrect or missing API key"), what
    assert service.authenticate(bearer(key)).name == "ci"  # the real key still works after all that


def test_revoked_key_is_refused(service: ApiKeyService) -> None:
    record, key = service.create("ci", "admin")
    assert service.revoke(record.id).revoked_at is not None
    with pytest.raises(Unauthenticated):
        service.authenticate(bearer(key))
    assert not service.has_active_admin()


def test_expired_key_is_refused(service: ApiKeyService, conn: sqlite3.Connection) -> None:
    record, key = service.create("short", "admin", timedelta(seconds=1))
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat(timespec="seconds")
    conn.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", (past, record.id))
    with pytest.raises(Unauthenticated):
        service.authenticate(bearer(key))
    assert not service.has_active_admin()


def test_unknown_role_and_empty_name_are_refused(service: ApiKeyService) -> None:
    with pytest.raises(InvalidRequest) as info:
        service.create("ci", "superuser")
    assert info.value.param == "role"
    with pytest.raises(InvalidRequest) as info:
        service.create("  ", "admin")
    assert info.value.param == "name"
    assert service.list() == []


def test_revoking_an_unknown_key_is_an_error(service: ApiKeyService) -> None:
    with pytest.raises(InvalidRequest, match="no API key"):
        service.revoke("nosuchid")


def test_secret_is_never_stored(service: ApiKeyService, conn: sqlite3.Connection, data: DataDir) -> None:
    _, key = service.create("ci", "admin")
    _, secret_part, _ = parts(key)
    service.authenticate(bearer(key))
    rows = [tuple(row) for row in conn.execute("SELECT * FROM api_keys")]
    assert rows
    dump = "\n".join(conn.iterdump())  # every table, not just api_keys
    for stored in [repr(rows), dump]:
        assert key not in stored
        assert secret_part not in stored
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    on_disk = b"".join(p.read_bytes() for p in data.root.glob("appliance.db*"))
    assert secret_part.encode() not in on_disk


def test_keys_from_another_master_key_are_refused(service: ApiKeyService, conn: sqlite3.Connection) -> None:
    _, key = service.create("ci", "admin")
    other = ApiKeyService(conn, derive_pepper(secrets.token_bytes(32)))
    with pytest.raises(Unauthenticated):
        other.authenticate(bearer(key))


@pytest.mark.parametrize(("text", "expected"), [
    ("30d", timedelta(days=30)),
    ("12h", timedelta(hours=12)),
    ("10m", timedelta(minutes=10)),
    ("5s", timedelta(seconds=5)),
    ("2w", timedelta(weeks=2)),
    (" 1d ", timedelta(days=1)),
])
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "1.5h", "-5s", "10 m", "30days", "1d2h", "s5"])
def test_parse_duration_refuses_junk(text: str) -> None:
    with pytest.raises(InvalidRequest, match="not a duration") as info:
        parse_duration(text)
    assert info.value.param == "expires"


def test_zero_lifetime_does_not_mean_forever(service: ApiKeyService) -> None:
    record, _ = service.create("zero", "admin", parse_duration("0s"))
    assert record.expires_at is not None


def test_expiry_is_rounded_up_never_down(service: ApiKeyService) -> None:
    before = datetime.now(UTC)
    key, _ = service.create("short", "admin", timedelta(seconds=1))
    assert key.expires_at is not None
    assert datetime.fromisoformat(key.expires_at) >= before + timedelta(seconds=1)
