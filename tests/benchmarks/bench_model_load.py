"""Loading the default model from the encrypted store against loading it from a plaintext file, side by side.

    .venv/bin/python -m tests.benchmarks.bench_model_load [--rounds 5] [--model GGUF] [--enforce]

Both contenders start the real llama.cpp worker (the supervisor's WorkerProcess, the engine's own launch
arguments) and measure, from the moment the load is asked for:
  ready        the worker answers /health (the model is loaded)
  first token  a 1-token completion has come back from the worker
  plaintext    the worker opens a plaintext GGUF (on tmpfs, so that this benchmark leaves no plaintext weights on
               disk; the page cache makes a disk file the same)
  encrypted    the store decrypts the blob into a sealed memfd (every segment authenticated), then the worker
               opens /proc/self/fd/N: what `appliance serve` does
Rounds alternate which contender goes first. The target (issue 7): encrypted / plaintext <= 1.3 for both times.

It also measures single-thread throughput in MB/s of plaintext: decrypting (AES-256-GCM segments, in memory),
decrypting into a memfd (what a load does), encrypting (what a pull does), and SHA-256 for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import io
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from appliance.config import CryptoSettings, LlamaCppSettings, LoggingSettings
from appliance.crypto.streaming import HEADER_LEN, StreamEncryptor, decrypt_segments, read_header
from appliance.datadir import DataDir
from appliance.engines.llamacpp import LlamaCppEngine
from appliance.logs import configure
from appliance.registry.store import ModelStore, is_tmpfs, open_model_store
from appliance.supervisor.process import LaunchSpec, WorkerProcess
from tests.server import DEFAULT_MODEL, appliance

TARGET_RATIO = 1.3
SMOL = Path("/tmp/smol.gguf")


@dataclasses.dataclass
class Timing:
    ready: list[float] = dataclasses.field(default_factory=list)
    first_token: list[float] = dataclasses.field(default_factory=list)


async def time_worker(launch: LaunchSpec, socket_path: Path, prepare: Callable[[], None] | None = None) -> tuple[
        float, float]:
    started = time.perf_counter()
    if prepare is not None:
        prepare()
    worker = WorkerProcess("bench", launch, socket_path, load_timeout=120, stop_timeout=10, request_timeout=60)
    await worker.start()
    try:
        await worker.wait_ready()
        ready = time.perf_counter() - started
        response = await worker.client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 1,
                                                                     "temperature": 0})
        response.raise_for_status()
        return ready, time.perf_counter() - started
    finally:
        await worker.stop()


@contextlib.contextmanager
def prepared(args: argparse.Namespace) -> Iterator[tuple[ModelStore, str, Path]]:
    """A scratch data dir with the model in the encrypted store, and the same GGUF as a plaintext file on tmpfs."""
    scratch = Path(tempfile.mkdtemp(prefix="appliance-bench-load-"))
    shm = Path(tempfile.mkdtemp(prefix="appliance-bench-plain-", dir="/dev/shm"))
    try:
        data = scratch / "data"
        appliance("init", data_dir=data)
        source = Path(args.model) if args.model else SMOL if SMOL.is_file() else None
        if source is not None:
            appliance("models", "pull", f"file:{source.resolve()}", "--name", DEFAULT_MODEL, data_dir=data)
        else:
            print(f"pulling {DEFAULT_MODEL} with `appliance models pull` ...", file=sys.stderr, flush=True)
            appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
        store = open_model_store(DataDir(data), CryptoSettings())
        [sha256] = store.stored_digests()
        plain = shm / "model.gguf"
        with store.open_for_load(sha256) as weights:
            shutil.copyfile(weights.path, plain)
        if not is_tmpfs(shm):
            raise SystemExit("/dev/shm is not a tmpfs here; refusing to write plaintext weights to disk")
        yield store, sha256, plain
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


async def load_rounds(store: ModelStore, sha256: str, plain: Path, rounds: int) -> dict[str, Timing]:
    engine = LlamaCppEngine(LlamaCppSettings())
    socket_path = store.root.parent / "run" / "bench.sock"
    timings = {"plaintext": Timing(), "encrypted": Timing()}

    async def plaintext() -> tuple[float, float]:
        return await time_worker(engine.launch(plain, "bench"), socket_path)

    async def encrypted() -> tuple[float, float]:
        with contextlib.ExitStack() as stack:
            launch: list[LaunchSpec] = []

            def decrypt() -> None:
                weights = stack.enter_context(store.open_for_load(sha256))
                launch.append(dataclasses.replace(engine.launch(weights.path, "bench"), pass_fds=weights.fds))

            started = time.perf_counter()
            decrypt()
            spent = time.perf_counter() - started
            ready, first = await time_worker(launch[0], socket_path)
            return ready + spent, first + spent

    contenders = {"plaintext": plaintext, "encrypted": encrypted}
    await plaintext()  # warm-up: page cache, imports
    for i in range(rounds):
        order = list(contenders) if i % 2 == 0 else list(reversed(contenders))
        for name in order:
            ready, first = await contenders[name]()
            timings[name].ready.append(ready)
            timings[name].first_token.append(first)
    return timings


def throughput(store: ModelStore, sha256: str, plain: Path) -> dict[str, tuple[float, float]]:
    """Single-thread MB/s (10^6 bytes of plaintext per second): by CPU time of this thread, and by the wall clock
    (which a busy machine slows down)."""
    blob = (store.root / f"sha256-{sha256}").read_bytes()
    size = plain.stat().st_size
    with (store.root / f"sha256-{sha256}").open("rb") as fh:
        _, data_key = store._open_key(sha256, fh)  # the benchmark times the bare decryption
    out: dict[str, tuple[float, float]] = {}

    def rate(fn: Callable[[], None]) -> tuple[float, float]:
        fn()
        runs = [_timed(fn) for _ in range(3)]
        return size / min(cpu for cpu, _ in runs) / 1e6, size / min(wall for _, wall in runs) / 1e6

    def decrypt_in_memory() -> None:
        fh = io.BytesIO(blob)
        header, _ = read_header(fh)
        for _ in decrypt_segments(data_key, header, fh, len(blob) - HEADER_LEN):
            pass

    def decrypt_into_memfd() -> None:
        with store.open_for_load(sha256):
            pass

    content = plain.read_bytes()
    chunks = [content[start : start + (1 << 20)] for start in range(0, len(content), 1 << 20)]

    def encrypt() -> None:  # in the 1 MiB chunks a pull streams
        enc = StreamEncryptor(data_key)
        enc.start()
        for chunk in chunks:
            for _ in enc.update(chunk):
                pass
        enc.finish()

    out["decrypt (AES-256-GCM segments, in memory)"] = rate(decrypt_in_memory)
    out["decrypt into a sealed memfd (the load path, incl. unwrap)"] = rate(decrypt_into_memfd)
    out["encrypt (the pull path, no disk)"] = rate(encrypt)
    def digest() -> None:
        hashlib.sha256(content).digest()

    out["sha256, for scale"] = rate(digest)
    return out


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", help="a GGUF to use instead of the default model")
    parser.add_argument("--enforce", action="store_true", help="exit 1 when a ratio misses the target")
    args = parser.parse_args(argv)
    configure(LoggingSettings(level="warning", format="console"))
    with prepared(args) as (store, sha256, plain):
        size_mb = plain.stat().st_size / 1e6
        print(f"model: {DEFAULT_MODEL} ({size_mb:.1f} MB), {args.rounds} rounds, alternating order")
        timings = asyncio.run(load_rounds(store, sha256, plain, args.rounds))
        rates = throughput(store, sha256, plain)
    ratios = []
    print(f"{'':12}{'ready (median s)':>18}{'first token (median s)':>26}")
    for name, t in timings.items():
        print(f"{name:12}{statistics.median(t.ready):>18.3f}{statistics.median(t.first_token):>26.3f}")
    for what in ("ready", "first_token"):
        enc = statistics.median(getattr(timings["encrypted"], what))
        base = statistics.median(getattr(timings["plaintext"], what))
        ratios.append(enc / base)
        verdict = "ok" if enc / base <= TARGET_RATIO else "MISSED"
        print(f"encrypted / plaintext, {what.replace('_', ' ')}: {enc / base:.2f}x "
              f"(+{(enc - base) * 1000:.0f} ms; target <= {TARGET_RATIO}x: {verdict})")
    print("throughput per core (MB/s of plaintext, best of 3; by CPU time / by wall clock):")
    for label, (cpu, wall) in rates.items():
        print(f"  {label}: {cpu:,.0f} / {wall:,.0f} MB/s")
    return 1 if args.enforce and max(ratios) > TARGET_RATIO else 0


if __name__ == "__main__":
    raise SystemExit(main())
