"""Keys users make for themselves (owned keys) and admin changes to users: an owned key acts with its owner's
current role and dies with the owner's account; only the owner may revoke it, another's reads as missing and is
audited as denied; nobody changes their own role or disables themselves."""

from __future__ import annotations

import pytest

from appliance.audit import AuditLog
from appliance.auth.keys import ApiKeyService
from appliance.auth.users import User, UserService
from appliance.errors import Forbidden, InvalidRequest, KeyNotFound, Unauthenticated
from tests.unit.conftest import PASSWORD


@pytest.fixture
def alice(users: UserService) -> User:
    return users.create("alice", "admin", PASSWORD)


def test_an_owned_key_has_its_owners_role_and_follows_it(api_keys: ApiKeyService, users: UserService,
                                                         alice: User) -> None:
    key, secret = api_keys.create_for_user(alice.id, alice.role, "laptop", actor=f"user:{alice.id}")
    assert key.role == "admin" and key.owner_user_id == alice.id
    assert api_keys.has_active_admin()
    principal = api_keys.authenticate(f"Bearer {secret}")
    assert principal.role == "admin" and principal.owner_user_id == alice.id

    users.set_role("alice", "auditor")
    assert api_keys.authenticate(f"Bearer {secret}").role == "auditor"
    assert not api_keys.has_active_admin()  # the key says admin, its owner no longer is
    users.disable("alice")
    with pytest.raises(Unauthenticated):
        api_keys.authenticate(f"Bearer {secret}")


def test_asking_for_another_role_is_refused_and_audited(api_keys: ApiKeyService, audit: AuditLog,
                                                        users: UserService) -> None:
    bob = users.create("bob", "user", PASSWORD)
    with pytest.raises(Forbidden, match="your own role"):
        api_keys.create_for_user(bob.id, bob.role, "root", "admin", actor=f"user:{bob.id}")
    assert api_keys.list() == []
    [record] = list(audit.export(action="key.create"))
    assert record["outcome"] == "denied" and record["actor"] == f"user:{bob.id}"


def test_only_the_owner_revokes_an_owned_key(api_keys: ApiKeyService, audit: AuditLog, users: UserService,
                                             alice: User) -> None:
    bob = users.create("bob", "user", PASSWORD)
    key, secret = api_keys.create_for_user(alice.id, alice.role, "laptop")
    admin_key, _ = api_keys.create("ci", "user")
    assert [k.id for k in api_keys.list(owner_user_id=alice.id)] == [key.id]
    for other in (key.id, admin_key.id, "nokey123"):
        with pytest.raises(KeyNotFound, match="you have no API key"):
            api_keys.revoke(other, actor=f"user:{bob.id}", owner_user_id=bob.id)
    denied = list(audit.export(action="key.revoke", actor=f"user:{bob.id}"))
    assert [(r["target"], r["outcome"]) for r in denied] == [(key.id, "denied"), (admin_key.id, "denied"),
                                                             ("nokey123", "denied")]
    api_keys.authenticate(f"Bearer {secret}")
    assert api_keys.revoke(key.id, actor=f"user:{alice.id}", owner_user_id=alice.id).revoked_at


def test_nobody_changes_their_own_role_or_disables_themselves(users: UserService, audit: AuditLog,
                                                              alice: User) -> None:
    users.create("bob", "user", PASSWORD)
    with pytest.raises(Forbidden, match="yourself"):
        users.update("alice", role="user", acting_user_id=alice.id)
    with pytest.raises(Forbidden, match="yourself"):
        users.update("alice", disabled=True, acting_user_id=alice.id)
    assert users.get("alice").role == "admin" and not users.get("alice").disabled
    assert users.update("alice", role="admin", disabled=False, acting_user_id=alice.id).role == "admin"
    changed = users.update("bob", role="auditor", disabled=True, acting_user_id=alice.id, actor=f"user:{alice.id}")
    assert changed.role == "auditor" and changed.disabled
    assert [r["outcome"] for r in audit.export(action="user.update")] == ["denied", "denied"]
    with pytest.raises(InvalidRequest, match="nothing to change"):
        users.update("bob")
