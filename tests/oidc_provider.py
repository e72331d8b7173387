"""A real OpenID Provider for the single sign-on tests: the npm package `oidc-provider` (tests/oidc/package.json and
its lock pin the version) run by the machine's Node with tests/oidc/provider.mjs, and a client that walks its sign-in
the way a browser does (httpx following redirects and posting the login form).

The package is installed once per lock file into <venv>/oidc-provider/<lock digest>/ by `npm ci`: by
`./install.sh --test` (`python -m tests.oidc_provider install`), else by the first test that needs it. Without
`node` and `npm` the tests skip, saying so."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import httpx

HERE = Path(__file__).parent / "oidc"
NO_NODE = ("the single sign-on tests run the OpenID Provider `oidc-provider` on Node.js: install node and npm "
           "(apt-get install nodejs npm), then ./install.sh --test installs the package")


def cache_dir() -> Path:
    """Where this lock file's packages go: beside the virtual environment, named by the lock's digest."""
    digest = hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()[:16]
    return Path(os.environ.get("APPLIANCE_TEST_OIDC_CACHE") or Path(sys.prefix) / "oidc-provider") / digest


def node_missing() -> str | None:
    """Why the provider cannot run here, or None."""
    return NO_NODE if not (shutil.which("node") and shutil.which("npm")) else None


def install() -> Path:
    """Install the pinned oidc-provider into the cache (once; later calls return at once). RuntimeError on failure."""
    target = cache_dir()
    if (target / "node_modules" / "oidc-provider" / "package.json").is_file():
        return target
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(HERE / name, staging / name)
    result = subprocess.run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"], cwd=staging,
                            capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"npm ci for oidc-provider failed (exit {result.returncode}); check the network to the npm "
                           f"registry:\n{result.stderr[-2000:]}")
    with contextlib.suppress(FileExistsError, OSError):
        staging.rename(target)  # another run may have finished first: theirs is as good
    shutil.rmtree(staging, ignore_errors=True)
    return target


class OpenIdProvider:
    """tests/oidc/provider.mjs on a free loopback port. Accounts: alice and dave (group appliance-admins; alice also
    staff), bob (staff), carol (appliance-auditors), local (preferred_username local-admin)."""

    def __init__(self, client_id: str, client_secret: str, log_path: Path) -> None:
        from tests.server import free_port  # not at import: `python -m tests.oidc_provider install` stays quick

        self.client_id = client_id
        self.client_secret = client_secret
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> OpenIdProvider:
        env = {**os.environ, "OIDC_MODULES": str(install()), "OIDC_PORT": str(self.port),
               "OIDC_CLIENT": json.dumps({"client_id": self.client_id, "client_secret": self.client_secret})}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(["node", str(HERE / "provider.mjs")], env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the OpenID Provider exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.issuer + "/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"the OpenID Provider did not serve discovery within {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def env(self, **settings: str) -> dict[str, str]:
        """APPLIANCE_OIDC__* variables for an appliance that signs in here; `settings` add or override some."""
        base = {"issuer": self.issuer, "client_id": self.client_id, "provider_name": "Test IdP",
                "scopes": json.dumps(["openid", "profile", "email", "groups"])}
        return {f"APPLIANCE_OIDC__{key.upper()}": value for key, value in {**base, **settings}.items()}


class _Form(HTMLParser):
    """The first form of a page: its action and its named inputs' values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = named.get("action") or ""
        elif tag == "input" and named.get("name"):
            self.fields[str(named["name"])] = named.get("value") or ""


def form_of(html: str) -> _Form:
    form = _Form()
    form.feed(html)
    assert form.action is not None, f"no form on the page:\n{html[:2000]}"
    return form


def follow(http: httpx.Client, response: httpx.Response, stop_at: str) -> httpx.Response:
    """Follow redirects until the next one would go to a URL starting with `stop_at` (not requested), or a page."""
    hops = 0
    while response.is_redirect:
        location = urljoin(str(response.url), response.headers["location"])
        if location.startswith(stop_at):
            return response
        response = http.get(location)
        hops += 1
        assert hops < 10, "too many redirects"
    return response


def sign_in(http: httpx.Client, appliance_url: str, login: str, *, authorize: Callable[[str], str] | None = None,
            callback: Callable[[str], str] | None = None) -> httpx.Response:
    """Walk the whole sign-in as a browser does: the appliance's start URL, the provider's login page (the dev
    interaction takes any password), back to the appliance's callback. Returns the callback's response; the
    session cookie, when one is set, is in `http.cookies`. `authorize` and `callback` may rewrite the authorization
    URL and the callback URL on the way (what an attacker in the middle would try)."""
    start = http.get(appliance_url + "/api/auth/oidc/login")
    assert start.status_code == 302, start.text
    location = start.headers["location"]
    page = follow(http, http.get(authorize(location) if authorize else location), appliance_url)
    if "<form" in page.text:  # no session at the provider yet: its login page
        form = form_of(page.text)
        page = follow(http, http.post(urljoin(str(page.url), form.action),
                                      data={**form.fields, "login": login, "password": "any password will do"}),
                      appliance_url)
    assert page.is_redirect, (page.status_code, page.text[:500])
    location = page.headers["location"]
    return http.get(callback(location) if callback else location)


def signed_out_at_provider(http: httpx.Client, end_session_url: str, appliance_url: str) -> httpx.Response:
    """Confirm the provider's sign-out page; returns the redirect back to the appliance."""
    page = http.get(end_session_url)
    assert page.status_code == 200, (page.status_code, page.text[:500])
    form = form_of(page.text)
    answer = http.post(urljoin(str(page.url), form.action), data={**form.fields, "logout": "yes"})
    return follow(http, answer, appliance_url)


def error_code(response: httpx.Response) -> str | None:
    """`signin_error` of a redirect back to the sign-in page, else None."""
    match = re.search(r"[?&]signin_error=([a-z_]+)", response.headers.get("location", ""))
    return match.group(1) if match else None


if __name__ == "__main__":  # `python -m tests.oidc_provider install`, for install.sh
    if len(sys.argv) != 2 or sys.argv[1] != "install":
        sys.exit("usage: python -m tests.oidc_provider install")
    if reason := node_missing():
        print(f"skipped: {reason}", file=sys.stderr)
        sys.exit(0)
    print(install())
