"""`appliance keys create|list|revoke|has-admin`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.cli.common import Add, cli_actor, limits_text, open_audit, positive_int
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def _keys(loaded: LoadedSettings) -> Any:
    from appliance.auth.keys import ApiKeyService, derive_pepper
    from appliance.auth.rbac import Rbac

    data = DataDir(loaded.settings.data_path)
    audit = open_audit(data)
    roles = Rbac.load(loaded.settings.auth.rbac_file).roles
    return ApiKeyService(audit.conn, derive_pepper(data.read_master_key()), audit=audit, roles=roles)


def _narrowed_text(key: Any) -> str:
    """`scopes=chat:use,models:read models=all collections=all`."""
    return " ".join(f"{k}={','.join(v) if (v := getattr(key, k)) is not None else 'all'}"
                    for k in ("scopes", "models", "collections"))


def cmd_keys_create(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.auth.keys import parse_duration
    from appliance.auth.quotas import Limits
    from appliance.auth.restrictions import Restrictions, split_names

    expires = parse_duration(args.expires) if args.expires else None
    limits = Limits(args.rpm, args.tpm, args.daily_tokens)
    narrowed = Restrictions(*(split_names(text) if text is not None else None
                              for text in (args.scopes, args.models, args.collections)))
    key, secret = _keys(loaded).create(args.name, args.role, expires, limits=limits, actor=cli_actor(),
                                       narrowed=narrowed)
    print(f"created API key {key.id} '{key.name}' role={key.role} expires={key.expires_at or 'never'} "
          f"{limits_text(key)} {_narrowed_text(key)}", file=sys.stderr)
    print("store it now: it is shown only this once", file=sys.stderr, flush=True)
    print(secret)
    return 0


def cmd_keys_list(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    for key in _keys(loaded).list():
        state = "revoked" if key.revoked_at else "active"
        print(f"{key.id}\t{key.name}\t{key.role}\t{state}\texpires={key.expires_at or 'never'}\t"
              f"last_used={key.last_used_at or 'never'}\t{_narrowed_text(key)}\t{limits_text(key)}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    key = _keys(loaded).revoke(args.id, actor=cli_actor())
    print(f"revoked {key.id} '{key.name}'")
    return 0


def cmd_keys_has_admin(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    return 0 if _keys(loaded).has_active_admin() else 1


def register(sub: Any, add: Add) -> None:
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="sub", required=True)
    create = add("create", cmd_keys_create, "create an API key; prints it once, alone on the last line", keys)
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True)
    create.add_argument("--expires", help="lifetime such as 30d, 12h, 10m, 5s; default never")
    create.add_argument("--rpm", type=positive_int, help="requests per minute; default unlimited")
    create.add_argument("--tpm", type=positive_int, help="tokens (prompt + completion) per minute; default unlimited")
    create.add_argument("--daily-tokens", type=positive_int, help="tokens per UTC day; default unlimited")
    create.add_argument("--scopes", help="comma-separated permissions, each granted by the role (e.g. "
                        "chat:use,models:read); default the role's every permission")
    create.add_argument("--models", help="comma-separated models the key may use; default every model")
    create.add_argument("--collections", help="comma-separated RAG collections the key may use; default all")
    add("list", cmd_keys_list, "API keys with their scopes, models, collections and limits (never secrets)", keys)
    revoke = add("revoke", cmd_keys_revoke, "revoke an API key by id", keys)
    revoke.add_argument("id")
    add("has-admin", cmd_keys_has_admin, "exit 0 when an active admin key exists (used by install.sh)", keys)
