"""The llama.cpp that install.sh builds. On a CPU with AMX (Xeon Sapphire Rapids and later) a native build has
llama.cpp's AMX kernels, which crash the worker on its first decode (llama.cpp#20824): install.sh builds without them.
A build that has them again fails here with a clear message, before every chat test fails with a dead worker."""

from __future__ import annotations

import llama_cpp


def test_llama_cpp_is_built_without_the_amx_kernels() -> None:
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, f"rerun ./install.sh, which rebuilds llama.cpp without AMX: {info}"
