"""The source of a remote model: the upstreams that serve it (each with a weight and an optional concurrency limit)
and the model's name there, kept as one string in the registry so that a changed pool is a new version.

`remote:<url>[;weight=W][;concurrency=C][ <url2>...]#<upstream model>`; a model added by an earlier version,
`remote:<url>#<model>`, is a pool of one upstream with weight 1."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import msgspec

from appliance.errors import RegistryError

PREFIX = "remote:"
MAX_UPSTREAMS = 32


class UpstreamSpec(msgspec.Struct, frozen=True):
    url: str
    weight: int = 1
    concurrency: int = 0  # 0 = the `[remote] concurrency` setting


class RemoteSpec(msgspec.Struct, frozen=True):
    upstreams: list[UpstreamSpec]
    model: str  # the model's name upstream

    @property
    def urls(self) -> list[str]:
        return [u.url for u in self.upstreams]


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or any(c.isspace() or c in ";#" for c in url)):
        raise RegistryError(f"{url!r} is not an upstream base URL; give one like https://host:8000/v1", param="url")
    if parts.username or parts.password:  # it would show in listings, metrics and logs
        raise RegistryError(f"the upstream URL {parts.hostname!r} carries credentials; give the API key with "
                            "--api-key-stdin instead", param="url")
    return url.rstrip("/")


def remote_source(urls: Sequence[str], upstream_model: str, weights: Sequence[int] = (),
                  concurrency: Sequence[int] = ()) -> str:
    """The registry source of a model served by these upstreams (validated). `weights` and `concurrency`, when
    given, have one value per URL."""
    if not urls:
        raise RegistryError("name at least one upstream URL (--url)", param="url")
    if len(urls) > MAX_UPSTREAMS:
        raise RegistryError(f"{len(urls)} upstreams; at most {MAX_UPSTREAMS}", param="url")
    for what, values in (("weight", weights), ("concurrency", concurrency)):
        if values and len(values) != len(urls):
            raise RegistryError(f"give one --{what} per --url ({len(urls)}), or none", param=what)
        if any(v < 1 or v > 10_000 for v in values):
            raise RegistryError(f"each --{what} is a whole number from 1 to 10000", param=what)
    if not upstream_model or "#" in upstream_model or any(c.isspace() for c in upstream_model):
        raise RegistryError("name the upstream's model (--upstream-model)", param="upstream_model")
    checked = [_check_url(u) for u in urls]
    if len(set(checked)) != len(checked):
        raise RegistryError("the same upstream URL is given twice", param="url")
    parts = []
    for i, url in enumerate(checked):
        weight = weights[i] if weights else 1
        limit = concurrency[i] if concurrency else 0
        parts.append(url + (f";weight={weight}" if weight != 1 else "") + (f";concurrency={limit}" if limit else ""))
    return f"{PREFIX}{' '.join(parts)}#{upstream_model}"


def parse_remote_source(source: str) -> RemoteSpec:
    """The upstreams and upstream model of a `remote:` source (as `remote_source` wrote it)."""
    pool, _, model = source.removeprefix(PREFIX).rpartition("#")
    upstreams = []
    for part in pool.split():
        url, *options = part.split(";")
        values = dict(option.partition("=")[::2] for option in options)
        upstreams.append(UpstreamSpec(url, int(values.get("weight", 1)), int(values.get("concurrency", 0))))
    return RemoteSpec(upstreams, model)
