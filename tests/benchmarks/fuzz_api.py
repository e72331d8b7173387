"""The long API fuzzing run (issue 18): schemathesis over the app's own OpenAPI document with many examples per
operation and its stateful phase (links between operations), with an admin key and with a `user` key, against a
fresh server of its own or against `--url` (`--admin-key`, `--user-key`). The fast run is
tests/integration/test_api_fuzz.py.

    .venv/bin/python -m tests.benchmarks.fuzz_api --max-examples 200 --report-dir /tmp/fuzz
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.fuzz import fetch_schema, run_schemathesis
from tests.server import DEFAULT_MODEL, ServerProcess, appliance, new_key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=200, help="examples per operation (default 200)")
    parser.add_argument("--url", help="an installed appliance instead of a fresh server")
    parser.add_argument("--admin-key", help="with --url: an admin key")
    parser.add_argument("--user-key", help="with --url: a key with the user role")
    parser.add_argument("--report-dir", type=Path, help="where the JUnit reports go (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per role (default 3600)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fuzz-api-"))
    report_dir = args.report_dir or work / "reports"
    server = None
    if args.url:
        if not (args.admin_key and args.user_key):
            parser.error("--url needs --admin-key and --user-key")
        url, keys = args.url.rstrip("/"), {"admin": args.admin_key, "user": args.user_key}
    else:
        data = work / "data"
        appliance("init", data_dir=data)
        appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
        keys = {"admin": new_key(data), "user": new_key(data, role="user")}
        server = ServerProcess(data).start()
        url = server.url
    failed = False
    try:
        schema = fetch_schema(url, keys["admin"], work / "openapi.json")
        for role, key in keys.items():
            rc, output, tested = run_schemathesis(schema, url, key, args.max_examples, report_dir / role,
                                                  timeout=args.timeout)
            print(f"== {role} key: exit {rc}, {tested} operations tested ==\n{output}", flush=True)
            failed |= rc != 0
    finally:
        if server is not None:
            server.stop()
    print(f"reports in {report_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
