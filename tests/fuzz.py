"""schemathesis over the app's own OpenAPI document against a running server: the command line that the fast
test (tests/integration/test_api_fuzz.py) and the long run (tests/benchmarks/fuzz_api.py) share."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
"""No 5xx; bodies, statuses and content types as documented."""

EXCLUDED_PATHS = r"^/schema|^/api/models/pull$|^/api/policies/rbac$|^/api/models/\{ref\}$"
"""Left out: Litestar's own documentation pages; pulls (they reach the network and fill the disk); the roles file
(a fuzzed one that parses could take the admin role's permissions away and turn the rest of the run into 403s);
model deletes (the default model would go and every generation after would be a 503)."""


def fetch_schema(url: str, admin_key: str, target: Path) -> Path:
    """The OpenAPI document as the server serves it (reading it needs metrics:read, so with an admin key)."""
    response = httpx.get(f"{url}/schema/openapi.json", headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    response.raise_for_status()
    target.write_bytes(response.content)
    return target


def run_schemathesis(schema: Path, url: str, key: str, max_examples: int, report_dir: Path,
                     extra: list[str] | None = None, timeout: float = 600) -> tuple[int, str, int]:
    """Run `st run` with `key`; its exit status, its output and the number of operations it tested."""
    st = Path(sys.executable).with_name("st")
    command = [str(st), "run", str(schema), "--url", url, "-H", f"Authorization: Bearer {key}",
               "--checks", CHECKS, "--max-examples", str(max_examples), "--exclude-path-regex", EXCLUDED_PATHS,
               "--request-timeout", "60", "--workers", "1", "--no-color", "--report", "junit",
               "--report-dir", str(report_dir), *(extra or [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    output = done.stdout + done.stderr
    tested = re.search(r"Tested: (\d+)", output)
    return done.returncode, output, int(tested.group(1)) if tested else 0
