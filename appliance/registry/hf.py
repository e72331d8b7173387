"""`hf:OWNER/REPO[/FILE]` sources through `huggingface_hub` (the `hf` extra) for boxes with internet.

The hub library names the files and their digests (it honours HF_ENDPOINT and the saved token); the bytes come
through the checked downloader in `sources`, so nothing lands in the hub's plaintext cache and every redirect and
address is checked."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

from appliance.errors import RegistryError
from appliance.registry.folder import refuse_unsafe_folder
from appliance.registry.sources import (
    Download,
    ImportPolicy,
    Progress,
    SourceSpec,
    fetch,
    refuse_pickle,
    safe_relative,
)

MAX_CONFIG_BYTES = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise RegistryError("hf: sources need the huggingface_hub package; install the extra: "
                            "pip install 'appliance[hf]'", code="missing_dependency") from None
    return huggingface_hub


def _repo_files(hub: Any, repo: str) -> list[str]:
    try:
        return [safe_relative(f, "file in the repository") for f in hub.HfApi().list_repo_files(repo)]
    except hub.errors.RepositoryNotFoundError:
        raise RegistryError(f"no repository {repo} on the hub (or it is private and no token is set)",
                            code="source_not_found") from None
    except hub.errors.HfHubHTTPError as exc:
        raise RegistryError(f"the hub refused to list {repo}: {exc}", code="source_not_found") from None


def _config(hub: Any, repo: str, policy: ImportPolicy) -> dict[str, Any]:
    small = ImportPolicy(policy.allow_private_sources, MAX_CONFIG_BYTES, policy.allow_remote_code)
    with fetch(hub.hf_hub_url(repo, "config.json"), small, hub.utils.build_hf_headers(), "config.json") as download:
        raw = b"".join(download.chunks)
    try:
        config = json.loads(raw)
    except ValueError:
        raise RegistryError(f"{repo}/config.json is not JSON", code="unsupported_format") from None
    return config if isinstance(config, dict) else {}


def pick_file(hub: Any, repo: str, policy: ImportPolicy) -> str:
    """The repository's one GGUF file; a folder is checked for code first, then refused (not storable yet)."""
    files = _repo_files(hub, repo)
    if "config.json" in files:
        refuse_unsafe_folder(files, _config(hub, repo, policy), allow_remote_code=policy.allow_remote_code,
                             stored_whole=False)
    ggufs = [f for f in files if f.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        shown = ", ".join(ggufs[:8]) + (" ..." if len(ggufs) > 8 else "")
        raise RegistryError(f"{repo} has {len(ggufs)} GGUF files ({shown}); name one: hf:{repo}/FILE",
                            code="ambiguous_source")
    raise RegistryError(f"{repo} has no .gguf file; only GGUF models can be stored (Hugging Face folders are not "
                        "supported by the store yet)", code="unsupported_format")


@contextlib.contextmanager
def open_hf(spec: SourceSpec, policy: ImportPolicy, progress: Progress | None = None) -> Iterator[Download]:
    hub = _hub()
    repo = spec.location
    file = spec.member or pick_file(hub, repo, policy)
    refuse_pickle(file)
    url = hub.hf_hub_url(repo, file)
    headers = hub.utils.build_hf_headers()
    try:
        meta = hub.get_hf_file_metadata(url)
    except hub.errors.EntryNotFoundError:
        raise RegistryError(f"{repo} has no file {file}", code="source_not_found") from None
    except hub.errors.HfHubHTTPError as exc:
        raise RegistryError(f"the hub refused {repo}/{file}: {exc}", code="source_not_found") from None
    digest = meta.etag if meta.etag and _SHA256.match(meta.etag) else None  # LFS files: the etag is the sha256
    with fetch(url, policy, headers, file.rsplit("/", 1)[-1], progress) as download:
        if meta.size is not None and download.total is not None and meta.size != download.total:
            raise RegistryError(f"the hub announced {meta.size} bytes for {file} but the download has "
                                f"{download.total}", code="source_not_found")
        download.sha256 = digest
        yield download
