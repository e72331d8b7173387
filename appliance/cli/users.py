"""`appliance users create|list|disable|enable|set-role|set-limits|has-admin`."""

from __future__ import annotations

import argparse
import getpass
import secrets
import string
import sys
from typing import Any

from appliance.cli.common import KEEP, Add, cli_actor, limit_or_none, limits_text, open_audit, positive_int
from appliance.config import LoadedSettings
from appliance.datadir import DataDir
from appliance.errors import InvalidRequest


def _users(loaded: LoadedSettings) -> Any:
    from appliance.auth.passwords import derive_password_pepper
    from appliance.auth.rbac import Rbac
    from appliance.auth.users import UserService

    data = DataDir(loaded.settings.data_path)
    audit = open_audit(data)
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


# Letters and digits only, so that the password survives copying from a terminal and pasting into any shell or
# form; 24 of 62 symbols is about 143 bits, far beyond guessing.
_GENERATED_ALPHABET = string.ascii_letters + string.digits
GENERATED_LENGTH = 24


def generate_password() -> str:
    """A random password that passes the policy (`check_password`)."""
    return "".join(secrets.choice(_GENERATED_ALPHABET) for _ in range(GENERATED_LENGTH))


def cmd_users_create(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.auth.quotas import Limits

    service = _users(loaded)
    if args.generate_password:
        password = generate_password()
    else:
        password = _read_new_password(service, args.name, args.role, args.password_stdin)
    user = service.create(args.name, args.role, password, actor=cli_actor(),
                          limits=Limits(args.rpm, args.tpm, args.daily_tokens))
    created = f"created user {user.name} (role {user.role}, {limits_text(user)})"
    if not args.generate_password:
        print(created)
        return 0
    # As `keys create`: what was done on stderr, the secret alone on stdout, printed once and kept nowhere else.
    print(created, file=sys.stderr)
    print("store the password now: it is shown only this once", file=sys.stderr, flush=True)
    print(password)
    return 0


def cmd_users_has_admin(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    return 0 if any(user.role == "admin" and not user.disabled for user in _users(loaded).list()) else 1


def cmd_users_set_limits(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    changes = {k: v for k, v in (("rpm", args.rpm), ("tpm", args.tpm), ("daily_tokens", args.daily_tokens))
               if v is not KEEP}
    if not changes:
        raise InvalidRequest("nothing to change; give --rpm, --tpm and/or --daily-tokens (a number, or none to "
                             "remove the limit)", code="empty_update")
    user = _users(loaded).set_limits(args.name, changes, actor=cli_actor())
    print(f"{user.name} now has {limits_text(user)}")
    return 0


def cmd_users_list(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    users = _users(loaded).list()
    if not users:
        print("no users; `appliance users create NAME --role admin` adds one", file=sys.stderr)
    for user in users:
        print(f"{user.name}\t{user.role}\t{'disabled' if user.disabled else 'active'}\tcreated={user.created_at}\t"
              f"{limits_text(user)}")
    return 0


def cmd_users_disable(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    user = _users(loaded).disable(args.name, actor=cli_actor())
    print(f"disabled {user.name}: they can no longer log in (`appliance users enable {user.name}` undoes this)")
    return 0


def cmd_users_enable(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    user = _users(loaded).enable(args.name, actor=cli_actor())
    print(f"enabled {user.name}")
    return 0


def cmd_users_set_role(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    user = _users(loaded).set_role(args.name, args.role, actor=cli_actor())
    print(f"{user.name} now has role {user.role}")
    return 0


def register(sub: Any, add: Add) -> None:
    users = sub.add_parser("users", help="people who log in to the web UI").add_subparsers(dest="sub", required=True)
    ucreate = add("create", cmd_users_create, "create a user; the password is read from a pipe "
                  "(--password-stdin), typed twice at a terminal, or generated (--generate-password), never given "
                  "as an argument", users)
    ucreate.add_argument("name")
    ucreate.add_argument("--role", required=True)
    source = ucreate.add_mutually_exclusive_group()
    source.add_argument("--password-stdin", action="store_true",
                        help="read the password as one line from standard input")
    source.add_argument("--generate-password", action="store_true",
                        help="generate a strong password and print it once, alone on the last line")
    ucreate.add_argument("--rpm", type=positive_int, help="requests per minute, session and own keys together; "
                         "default unlimited")
    ucreate.add_argument("--tpm", type=positive_int, help="tokens per minute; default unlimited")
    ucreate.add_argument("--daily-tokens", type=positive_int, help="tokens per UTC day; default unlimited")
    add("list", cmd_users_list, "users with their role and state (never their password hashes)", users)
    add("has-admin", cmd_users_has_admin, "exit 0 when an enabled admin user exists (used by install.sh)", users)
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
        limits.add_argument(flag, type=limit_or_none, default=KEEP, help=f"{what}, or none for no limit")
