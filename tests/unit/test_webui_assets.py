"""The web UI's files as shipped: no build, no CDN, nothing vendored without its licence and digest, no HTML built
from strings, no secret in browser storage, within the size budget, and a module for every page in the shell."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

from appliance.admin.webui_routes import WebUiAssets, webui_dir
from appliance.errors import NotFound

WEBUI = webui_dir()
SIZE_BUDGET = 150 * 1024  # all JavaScript and CSS together, gzipped


def code_files() -> list[Path]:
    return sorted(p for p in WEBUI.rglob("*") if p.suffix in (".js", ".css", ".html") and "vendor" not in p.parts)


def test_the_ui_is_shipped_beside_the_package() -> None:
    assert (WEBUI / "index.html").is_file()
    assert (WEBUI / "js" / "app.js").is_file()


def test_every_vendored_file_is_in_the_manifest_with_licence_and_digest() -> None:
    manifest = json.loads((WEBUI / "vendor" / "manifest.json").read_text())
    listed = {}
    for library in manifest["libraries"]:
        assert library["name"] and library["version"] and library["licence"], library
        for entry in library["files"]:
            listed[entry["path"]] = entry["sha256"]
    on_disk = {p.relative_to(WEBUI / "vendor").as_posix() for p in (WEBUI / "vendor").rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert on_disk == set(listed), "vendored files and the manifest differ"
    for path, digest in listed.items():
        assert hashlib.sha256((WEBUI / "vendor" / path).read_bytes()).hexdigest() == digest, path


def test_nothing_loads_from_another_origin() -> None:
    remote = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|@import\s+url\(\s*["']?https?:|from\s+["']https?:|"""
                        r"""import\(\s*["']https?:|url\(\s*["']?https?:""", re.IGNORECASE)
    for path in code_files():
        assert not remote.search(path.read_text()), f"{path} loads something from another origin"


def test_no_html_from_strings_no_eval_no_browser_storage() -> None:
    forbidden = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function\(|"
                           r"localStorage|sessionStorage|setAttribute\(\s*[\"']on|javascript:")
    for path in code_files():
        if path.suffix == ".js":
            found = forbidden.search(path.read_text())
            assert found is None, f"{path}: {found.group(0) if found else ''}"


def test_no_inline_script_or_style_in_the_page() -> None:
    html = (WEBUI / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)


def test_all_javascript_and_css_fit_the_size_budget() -> None:
    total = sum(len(gzip.compress(p.read_bytes(), 9)) for p in WEBUI.rglob("*") if p.suffix in (".js", ".css"))
    assert 0 < total <= SIZE_BUDGET, f"{total} bytes gzipped"


def test_every_page_in_the_navigation_has_its_module() -> None:
    shell = (WEBUI / "js" / "app.js").read_text()
    pages = re.findall(r'path: "([a-z-]+)", title: "([^"]+)"', shell)
    assert [title for _, title in pages] == ["Dashboard", "Playground", "Models", "Collections", "Users", "API keys",
                                             "Usage", "Policies", "Privacy", "Audit", "Settings"]
    for path, _ in pages:
        module = WEBUI / "js" / "pages" / f"{path}.js"
        assert module.is_file() and "export async function render" in module.read_text(), path


def test_page_paths_get_the_shell_and_files_get_themselves(tmp_path: Path) -> None:
    (tmp_path / "js").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><title>x</title>")
    (tmp_path / "js" / "app.js").write_text("export const x = 1;\n" * 100)
    assets = WebUiAssets(tmp_path)
    assert assets.find("") is assets.files["index.html"]
    assert assets.find("/models") is assets.files["index.html"]
    assert assets.find("js/app.js").media_type.startswith("text/javascript")
    assert gzip.decompress(assets.find("js/app.js").gzipped or b"") == (tmp_path / "js" / "app.js").read_bytes()
    for missing in ("js/nope.js", "../pyproject.toml", "js/../../etc/passwd.txt"):
        with pytest.raises(NotFound):
            assets.find(missing)
