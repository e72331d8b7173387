"""`appliance oidc set-secret`: the client secret of the web UI's single sign-on, kept in keys/oidc/ (0600)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.cli.common import Add, cli_actor, open_audit
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def cmd_oidc_set_secret(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.audit import audited
    from appliance.auth.oidc import OIDC_SECRET
    from appliance.crypto.secret_files import SecretFiles

    data = DataDir(loaded.settings.data_path)
    audit = open_audit(data)
    secret = sys.stdin.readline().strip()
    files = SecretFiles(data.keys / "oidc", "OpenID client secret")
    with audited(audit, cli_actor(), "oidc.set_secret", "oidc-client", removed=not secret):
        if secret:
            files.save(OIDC_SECRET, secret)
        else:
            files.delete(OIDC_SECRET)
    print("the client secret is stored; restart the appliance to use it" if secret else
          "the client secret is removed (a public client with PKCE alone); restart the appliance")
    return 0


def register(sub: Any, add: Add) -> None:
    oidc = sub.add_parser("oidc", help="single sign-on to the web UI").add_subparsers(dest="sub", required=True)
    add("set-secret", cmd_oidc_set_secret, "store the OpenID client secret read from stdin (an empty line removes "
        "it); never shown again", oidc)
