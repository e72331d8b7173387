"""The llama.cpp that install.sh builds.

- On a CPU with AMX (Xeon Sapphire Rapids and later) a native build has llama.cpp's AMX kernels, which crash the
  worker on its first decode (llama.cpp#20824): install.sh builds without them. A build that has them again fails
  here with a clear message, before every chat test fails with a dead worker.
- install.sh applies the patches in appliance/engines/patches/llama.cpp to the vendored llama.cpp, and the package
  records which (name and hash). A build from PyPI's sdist as it is (the CPU's flash attention several times slower
  at long contexts), or with an older text of a patch, fails here."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parents[2]
PATCHES = ROOT / "appliance" / "engines" / "patches" / "llama.cpp"


def test_llama_cpp_is_built_without_the_amx_kernels() -> None:
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, f"rerun ./install.sh, which rebuilds llama.cpp without AMX: {info}"


def test_llama_cpp_is_built_with_every_patch_of_this_checkout() -> None:
    """As install.sh records them: each patch's name and the sha256 of its text, so an edited patch is rebuilt."""
    patches = sorted(f"{p.stem}={hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" for p in PATCHES.glob("*.patch"))
    assert patches, "appliance/engines/patches/llama.cpp holds no patch"
    try:
        from llama_cpp import _appliance_patches
    except ImportError:
        raise AssertionError("llama-cpp-python was not built by install.sh (no patch list): rerun ./install.sh"
                             ) from None
    assert sorted(_appliance_patches.PATCHES) == patches, "rerun ./install.sh to rebuild llama.cpp with the patches"


def test_the_pinned_version_is_the_one_the_patches_are_for() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = metadata.version("llama_cpp_python")
    assert f'"llama-cpp-python=={version}"' in pyproject
    for patch in PATCHES.glob("*.patch"):
        assert f"llama-cpp-python {version}" in patch.read_text().splitlines()[0], patch.name
