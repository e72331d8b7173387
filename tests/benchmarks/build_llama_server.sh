#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp vendored in the llama-cpp-python sdist the appliance pins,
# as upstream ships it (without appliance/engines/patches/llama.cpp, whose effect the batching benchmark measures
# with the rest). The binary lands in .bench/ (git-ignored).
#
#   tests/benchmarks/build_llama_server.sh [--version 0.3.36] [--out DIR] [--jobs N]
#
# Prints the path of the binary on its last line. Needs pip, cmake and a C++ compiler; no curl, no SSL.
set -euo pipefail

version=0.3.36
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/.bench"
jobs=$(nproc)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

binary="$out/llama-server-$version"
if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi
python=${PYTHON:-$root/.venv/bin/python}
src="$out/src-$version"
mkdir -p "$out"
if [[ ! -d "$src" ]]; then
  "$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$out/sdist"
  tar -xzf "$out/sdist/llama_cpp_python-$version.tar.gz" -C "$out"
  mv "$out/llama_cpp_python-$version" "$src"
fi
# as install.sh builds the appliance's llama.cpp: without the AMX kernels, which crash (llama.cpp#20824)
flags=""
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if printf 'int main(void) { return 0; }\n' | cc -x c $no_amx -o /dev/null - >/dev/null 2>&1; then flags=$no_amx; fi
cmake -S "$src/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$src/build" --target llama-server -j "$jobs" >&2
cp "$src/build/bin/llama-server" "$binary"
echo "$binary"
