"""The browser admin UI: the static files of `webui/` served under `/ui/` (a page path without a file extension gets
`index.html`, whose module routes on the client), `/` redirected there, and the security headers every response
carries. The files hold no data: they are public like a sign-in page, and every page reads the JSON API with the
session cookie and the CSRF header, so the UI can do nothing the API refuses."""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.response import Redirect

from appliance.auth.guards import PUBLIC, permission
from appliance.errors import NotFound
from appliance.resources import shipped

# Scripts and styles only from this origin (no inline script or style, no eval); nothing may frame the UI.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
)
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".json": "application/json",
         ".txt": "text/plain; charset=utf-8", ".png": "image/png", ".ico": "image/x-icon"}
COMPRESSIBLE = (".js", ".css", ".html", ".svg", ".json", ".txt")


def webui_dir() -> Path:
    """`webui/` of the checkout, or `<prefix>/share/webui` of a system install."""
    return shipped("webui/index.html").parent


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    media_type: str
    etag: str


class WebUiAssets:
    """Every file of the UI read once at start (the whole UI is ~100 KB), with its gzip and ETag precomputed, so a
    page load costs no disk reads and a revisit is a 304."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, Asset] = {}
        if not root.is_dir():
            return
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            body = path.read_bytes()
            suffix = path.suffix.lower()
            media = TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            packed = gzip.compress(body, 9, mtime=0) if suffix in COMPRESSIBLE and len(body) > 512 else None
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            self.files[path.relative_to(root).as_posix()] = Asset(body, packed, media, etag)

    def find(self, path: str) -> Asset:
        """The file at `path` under the UI; a page path (no extension) is the single-page shell, index.html."""
        relative = path.strip("/")
        if relative in self.files:
            return self.files[relative]
        if "." not in relative.rsplit("/", 1)[-1] and "index.html" in self.files:
            return self.files["index.html"]
        if "index.html" not in self.files:
            raise NotFound(f"the web UI is not installed (no index.html under {self.root}); reinstall with "
                           "./install.sh", code="webui_missing")
        raise NotFound(f"no web UI file '{relative}'", code="not_found")


def _assets(state: State) -> WebUiAssets:
    assets: WebUiAssets = state.services.webui
    return assets


@get("/", opt=permission(PUBLIC), include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/ui/", status_code=302)


def _serve(request: Request[Any, Any, State], state: State, path: str) -> Response[bytes]:
    asset = _assets(state).find(path)
    headers = {"etag": asset.etag, "cache-control": "no-cache", "vary": "accept-encoding"}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(b"", status_code=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        body = asset.gzipped
        headers["content-encoding"] = "gzip"
    return Response(body, media_type=asset.media_type, headers=headers)


@get("/ui", opt=permission(PUBLIC), include_in_schema=False)
async def ui_shell(request: Request[Any, Any, State], state: State) -> Response[bytes]:
    return _serve(request, state, "")


@get("/ui/{path:path}", opt=permission(PUBLIC), include_in_schema=False)
async def ui_file(request: Request[Any, Any, State], state: State, path: FromPath[str]) -> Response[bytes]:
    return _serve(request, state, path)


ROUTES = [root, ui_shell, ui_file]
UI_PATHS = ("^/$", "^/ui(/.*)?$")  # public: the files hold no data (see the module docstring)
