"""Keys narrower than their role: scopes (checked against the registry and the role), allowed models (refused as
an unknown model, and audited), allowed collections (stored and carried for RAG), all shown by list and audited."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from appliance.audit import AuditLog
from appliance.auth.guards import effective_permissions
from appliance.auth.keys import ApiKeyService, derive_pepper
from appliance.auth.rbac import Rbac
from appliance.auth.restrictions import Restrictions, split_names
from appliance.cli import build_parser
from appliance.datadir import DataDir
from appliance.errors import InvalidRequest, ModelNotFound
from appliance.gateway.service import CompletionService


@pytest.fixture
def rbac() -> Rbac:
    return Rbac.load()


@pytest.fixture
def api_keys(data: DataDir, conn: sqlite3.Connection, audit: AuditLog, rbac: Rbac) -> ApiKeyService:
    return ApiKeyService(conn, derive_pepper(data.read_master_key()), audit=audit, roles=rbac.roles)


def test_scopes_narrow_the_role_and_reach_the_principal(api_keys: ApiKeyService, rbac: Rbac) -> None:
    key, secret = api_keys.create("bot", "admin", narrowed=Restrictions(scopes=["chat:use", "models:read"]))
    assert key.scopes == ["chat:use", "models:read"] and key.models is None and key.collections is None
    principal = api_keys.authenticate(f"Bearer {secret}")
    assert principal.scopes == frozenset({"chat:use", "models:read"})
    assert effective_permissions(principal, rbac) == frozenset({"chat:use", "models:read"})
    whole = api_keys.authenticate(f"Bearer {api_keys.create('all', 'user')[1]}")
    assert whole.scopes is None and effective_permissions(whole, rbac) == rbac.roles["user"]


@pytest.mark.parametrize(("role", "scopes", "named", "code"), [
    ("admin", ["chat:use", "root:all"], "root:all", "unknown_scope"),
    ("auditor", ["audit:read", "chat:use"], "chat:use", "scope_not_in_role"),
    ("user", ["keys:manage"], "keys:manage", "scope_not_in_role"),
])
def test_a_scope_outside_the_registry_or_the_role_is_a_400_naming_it(api_keys: ApiKeyService, audit: AuditLog,
                                                                     role: str, scopes: list[str], named: str,
                                                                     code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        api_keys.create("bot", role, narrowed=Restrictions(scopes=scopes))
    assert named in caught.value.message and caught.value.param == "scopes" and caught.value.code == code
    assert api_keys.list() == []
    assert [r["outcome"] for r in audit.export(action="key.create")] == ["error"]


@pytest.mark.parametrize("narrowed", [Restrictions(scopes=[]), Restrictions(models=[]),
                                      Restrictions(collections=["ok", "no spaces"]),
                                      Restrictions(models=["apl_" + "a" * 46])])
def test_empty_lists_and_bad_names_are_refused(api_keys: ApiKeyService, narrowed: Restrictions) -> None:
    with pytest.raises(InvalidRequest):
        api_keys.create("bot", "user", narrowed=narrowed)


def test_models_and_collections_round_trip_through_the_database(api_keys: ApiKeyService) -> None:
    narrowed = Restrictions(models=["smollm2-135m-instruct", "qwen:7b"], collections=["hr-policies", "eng/wiki",
                                                                                      "hr-policies"])
    key, secret = api_keys.create("rag", "user", narrowed=narrowed)
    assert key.models == ["smollm2-135m-instruct", "qwen:7b"]
    assert key.collections == ["hr-policies", "eng/wiki"]  # duplicates dropped, order kept
    assert api_keys.get(key.id) == key and api_keys.list() == [key]
    principal = api_keys.authenticate(f"Bearer {secret}")
    assert principal.collections == ("hr-policies", "eng/wiki")
    assert principal.models == frozenset({"smollm2-135m-instruct", "qwen:7b"}) and principal.scopes is None


def test_key_create_audits_scopes_models_and_collections(api_keys: ApiKeyService, audit: AuditLog) -> None:
    api_keys.create("bot", "user", narrowed=Restrictions(["chat:use"], ["m1"], ["c1", "c2"]), actor="cli:root")
    (record,) = audit.export(action="key.create")
    details: dict[str, Any] = record["details"]
    assert (details["scopes"], details["models"], details["collections"]) == (["chat:use"], ["m1"], ["c1", "c2"])
    api_keys.create("plain", "user")
    assert "scopes" not in list(audit.export(action="key.create"))[-1]["details"]


def test_an_owned_keys_scopes_must_be_granted_by_its_owners_role(api_keys: ApiKeyService) -> None:
    with pytest.raises(InvalidRequest, match="metrics:read"):
        api_keys.create_for_user("u1", "user", "laptop", narrowed=Restrictions(scopes=["metrics:read"]))


def test_a_model_outside_the_keys_models_reads_as_unknown_and_is_audited(api_keys: ApiKeyService,
                                                                        audit: AuditLog) -> None:
    service = CompletionService(None, None, None, audit=audit)  # type: ignore[arg-type]  # check_model needs none
    _, secret = api_keys.create("bot", "user", narrowed=Restrictions(models=["allowed"]))
    principal = api_keys.authenticate(f"Bearer {secret}")
    service.check_model("allowed", principal)
    service.check_model("anything", None)
    with pytest.raises(ModelNotFound) as caught:
        service.check_model("secret-model", principal)
    from appliance.registry.service import model_not_found

    expected = model_not_found("secret-model")
    assert (caught.value.message, caught.value.code, caught.value.status_code) == (
        expected.message, "model_not_found", 404)
    (record,) = audit.export(action="model.use")
    assert record["outcome"] == "denied" and record["target"] == "secret-model"
    assert record["actor"] == principal.subject


def test_cli_takes_comma_separated_lists() -> None:
    args = build_parser().parse_args(["keys", "create", "--name", "n", "--role", "user", "--scopes",
                                      "chat:use, models:read", "--models", "m1", "--collections", "a,b"])
    assert split_names(args.scopes) == ["chat:use", "models:read"] and split_names(args.collections) == ["a", "b"]
