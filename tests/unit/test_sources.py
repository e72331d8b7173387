"""Import sources against a real local HTTP stand-in on 127.0.0.1: address checks (refused by default, allowed by
the setting), every redirect re-checked, size limits, credentials kept to the first host; path canonicalisation,
pickle refusal and Hugging Face folder checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import RegistryError
from appliance.registry.folder import refuse_unsafe_folder
from appliance.registry.sources import ImportPolicy, SourceSpec, check_address, fetch, open_source, parse_source
from tests.standin_http import Route, StandIn

LAN = ImportPolicy(allow_private_sources=True)
BODY = os.urandom(3 * (1 << 20) + 17)  # more than one chunk


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


def download(url: str, policy: ImportPolicy, headers: dict[str, str] | None = None) -> bytes:
    with fetch(url, policy, headers) as got:
        return b"".join(got)


def test_download_from_an_allowed_mirror_streams_every_byte(standin: StandIn) -> None:
    url = standin.file("/m.gguf", BODY)
    with open_source(parse_source(url, LAN), LAN) as got:
        assert got.total == len(BODY)
        assert b"".join(got) == BODY
    (seen,) = standin.requests_to("/m.gguf")
    assert seen.headers["host"] == f"127.0.0.1:{standin.port}"
    assert seen.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("url", ["https://127.0.0.1:9/m.gguf", "https://localhost:9/m.gguf",
                                 "https://[::1]:9/m.gguf", "https://10.1.2.3/m.gguf", "https://192.168.0.1/m.gguf"])
def test_loopback_and_private_targets_are_refused_by_default(url: str) -> None:
    with pytest.raises(RegistryError, match="loopback, private or reserved") as info:
        download(url, ImportPolicy())
    assert info.value.code == "forbidden_source"
    assert "allow_private_sources" in info.value.message


def test_the_stand_in_is_refused_without_the_setting(standin: StandIn) -> None:
    url = standin.file("/m.gguf", BODY)
    https_url = url.replace("http://", "https://")
    with pytest.raises(RegistryError, match="plain http:// sources are refused"):
        parse_source(url)
    with pytest.raises(RegistryError, match="loopback"):
        download(https_url, ImportPolicy())
    with pytest.raises(RegistryError, match="not an https:// URL"):
        download(url, ImportPolicy())
    assert standin.seen == []  # refused before any connection


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x",
                                    "http://0.0.0.0/x", "http://224.0.0.1/x"])
def test_link_local_and_odd_addresses_are_refused_even_when_private_ones_are_allowed(
    standin: StandIn, target: str
) -> None:
    url = standin.redirect("/r", target)
    with pytest.raises(RegistryError, match="link-local, multicast or unspecified"):
        download(url, LAN)
    assert [s.path for s in standin.seen] == ["/r"]  # the redirect was followed only after its target was checked


def test_every_redirect_is_checked(standin: StandIn) -> None:
    url = standin.redirect("/r1", "/r2")
    standin.redirect("/r2", f"http://localhost:{standin.port}/m.gguf", status=307)
    standin.file("/m.gguf", BODY)
    assert download(url, LAN) == BODY
    # the same chain, with a hop to plain http on a public address: refused at that hop
    standin.redirect("/r2", "http://93.184.215.14/m.gguf")
    with pytest.raises(RegistryError, match="plain http is allowed only to hosts on your own network"):
        download(url, LAN)
    standin.redirect("/r2", "ftp://example.org/m.gguf")
    with pytest.raises(RegistryError, match="not an https:// URL"):
        download(url, LAN)


def test_redirect_loops_end(standin: StandIn) -> None:
    url = standin.redirect("/loop", "/loop")
    with pytest.raises(RegistryError, match="redirected more than 5 times"):
        download(url, LAN)
    assert len(list(standin.requests_to("/loop"))) == 6


def test_credentials_stay_with_the_first_host(standin: StandIn) -> None:
    url = standin.redirect("/r", f"http://localhost:{standin.port}/m.gguf")
    standin.file("/m.gguf", BODY)
    assert download(url, LAN, {"Authorization": "Bearer secret"}) == BODY
    first, second = standin.seen
    assert first.headers["authorization"] == "Bearer secret"
    assert "authorization" not in second.headers
    assert second.headers["host"] == f"localhost:{standin.port}"  # connected to the checked address, named host


def test_size_limit_from_the_announced_length(standin: StandIn) -> None:
    url = standin.file("/m.gguf", BODY)
    with pytest.raises(RegistryError, match="over the limit") as info:
        download(url, ImportPolicy(allow_private_sources=True, max_download_bytes=1 << 20))
    assert info.value.code == "too_large"


def test_size_limit_while_streaming_without_a_length(standin: StandIn) -> None:
    standin.routes["/m.gguf"] = Route(200, BODY, announce_length=False)
    assert download(standin.url + "/m.gguf", LAN) == BODY
    with pytest.raises(RegistryError, match="over the limit"):
        download(standin.url + "/m.gguf", ImportPolicy(allow_private_sources=True, max_download_bytes=1 << 20))


def test_http_errors_are_reported(standin: StandIn) -> None:
    with pytest.raises(RegistryError, match="answered 404") as info:
        download(standin.url + "/missing.gguf", LAN)
    assert info.value.code == "source_not_found"


def test_check_address_gives_the_address_to_pin() -> None:
    assert check_address("127.0.0.1", 80, LAN) == "127.0.0.1"
    with pytest.raises(RegistryError, match="cannot resolve"):
        check_address("no-such-host.invalid", 443, ImportPolicy())


@pytest.mark.parametrize("text", ["pypi:dist==1.0#../evil.gguf", "pypi:dist==1.0#/etc/passwd",
                                  "pypi:dist==1.0#a/./b.gguf", "pypi:dist==1.0#a\\..\\b.gguf",
                                  "hf:../repo/m.gguf", "hf:org/repo/../../m.gguf", "hf:org/repo//etc/m.gguf",
                                  "hf:org/../m.gguf"])
def test_dotdot_and_absolute_paths_are_refused(text: str) -> None:
    with pytest.raises(RegistryError, match="not a plain relative path") as info:
        parse_source(text)
    assert info.value.code == "unsafe_path"


@pytest.mark.parametrize("text", ["file:/models/m.bin", "https://example.org/model.pt", "hf:org/repo/weights.pth",
                                  "file:/m.PKL", "hf:org/repo/m.ckpt", "pypi:d==1#pkg/m.pickle"])
def test_pickle_formats_are_refused(text: str) -> None:
    with pytest.raises(RegistryError, match="pickle-based formats") as info:
        parse_source(text)
    assert info.value.code == "unsupported_format"


def test_file_source_must_be_a_regular_file_within_the_limit(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not a regular file"), open_source(SourceSpec("file", str(tmp_path))):
        pass
    path = tmp_path / "m.gguf"
    path.write_bytes(BODY)
    with pytest.raises(RegistryError, match="over the limit"), \
            open_source(SourceSpec("file", str(path)), ImportPolicy(max_download_bytes=100)):
        pass
    link = tmp_path / "link.bin"
    link.symlink_to(path)  # the name says .bin, the target .gguf: the checked name is the resolved one
    with open_source(SourceSpec("file", str(link))) as got:
        assert b"".join(got) == BODY


def check_hf_folder(files: list[str], config: dict[str, object], policy: ImportPolicy) -> None:
    """The check an hf: repository's listing gets (only its GGUF file is taken from it)."""
    refuse_unsafe_folder(files, config, allow_remote_code=policy.allow_remote_code, stored_whole=False)


def test_hf_folder_with_remote_code_is_refused_unless_allowed() -> None:
    files = ["config.json", "model.safetensors"]
    for config in ({"auto_map": {"AutoModel": "modeling_x.X"}}, {"trust_remote_code": True}):
        with pytest.raises(RegistryError, match="trust_remote_code/auto_map") as info:
            check_hf_folder(files, config, ImportPolicy())
        assert info.value.code == "remote_code"
        check_hf_folder(files, config, ImportPolicy(allow_remote_code=True))
    with pytest.raises(RegistryError, match=r"ships code \(modeling_x.py\)"):
        check_hf_folder([*files, "modeling_x.py"], {}, ImportPolicy())
    check_hf_folder(files, {"architectures": ["LlamaForCausalLM"]}, ImportPolicy())


def test_hf_folder_with_only_pickled_weights_is_refused() -> None:
    with pytest.raises(RegistryError, match="pickle-based"):
        check_hf_folder(["config.json", "pytorch_model.bin"], {}, ImportPolicy())
    check_hf_folder(["config.json", "pytorch_model.bin", "model.safetensors"], {}, ImportPolicy())


def test_progress_goes_to_a_callback_instead_of_the_bar(standin: StandIn, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A pull from the API follows the bytes through `progress`; the CLI's bar on stderr stays for everyone else."""
    seen: list[tuple[int, int | None]] = []
    with open_source(parse_source(standin.file("/m.gguf", BODY), LAN), LAN, progress=lambda n, t: seen.append((n, t))
                     ) as got:
        assert b"".join(got) == BODY
    assert seen[0] == (0, len(BODY)) and seen[-1] == (len(BODY), len(BODY)) and len(seen) >= 4
    local = tmp_path / "m.gguf"
    local.write_bytes(BODY[:1000])
    seen.clear()
    with open_source(parse_source(f"file:{local}"), progress=lambda n, t: seen.append((n, t))) as got:
        b"".join(got)
    assert seen[-1] == (1000, 1000)
    assert "import m.gguf" not in capsys.readouterr().err
    with open_source(parse_source(f"file:{local}")) as got:
        b"".join(got)
    assert "import m.gguf" in capsys.readouterr().err
