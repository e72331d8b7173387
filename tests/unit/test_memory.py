"""glibc's allocator settings for the server (appliance/memory.py), each checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from appliance import memory

pytestmark = pytest.mark.skipif(memory._glibc() is None, reason="glibc's malloc only")

ARENAS = """
import ctypes, ctypes.util, json, os, sys, threading
from appliance import memory
limited = memory.limit_arenas() if sys.argv[1] == "limit" else None
together = threading.Barrier(8)
def work():  # eight threads alive at once, each allocating: each takes an arena while the limit allows
    together.wait()
    blocks = [bytearray(4096) for _ in range(200)]
    together.wait()
    del blocks
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
os.dup2(1, 2)  # malloc_stats writes to stderr
sys.stdout.flush()
ctypes.CDLL(ctypes.util.find_library("c")).malloc_stats()
print(json.dumps(limited))
"""


def arenas(mode: str, **env: str) -> tuple[int, object]:
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env).stdout
    return sum(line.startswith("Arena ") for line in out.splitlines()), json.loads(out.splitlines()[-1])


def test_the_server_keeps_to_two_arenas_where_threads_would_take_one_each() -> None:
    unlimited, _ = arenas("none")
    limited, set_ = arenas("limit")
    assert set_ is True
    assert limited <= memory.ARENAS < unlimited


def test_malloc_arena_max_in_the_environment_wins() -> None:
    count, set_ = arenas("limit", MALLOC_ARENA_MAX="4")
    assert set_ is False
    assert 2 < count <= 4


TRIM = """
import json
from appliance import memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
blocks = [bytes(2000) + bytes([i % 256]) for i in range(60_000)]  # ~120 MiB from malloc's heap, not mmap
kept = blocks[::64]  # one block in 64 stays: the heap cannot shrink from its top
del blocks
before = rss()
trimmed = memory.trim()
print(json.dumps([before, rss(), trimmed, len(kept)]))
"""


def test_trim_hands_back_the_free_pages_that_free_keeps() -> None:
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True).stdout
    before, after, trimmed, _ = json.loads(out)
    assert trimmed is True
    assert before - after > 60, (before, after)
