#!/usr/bin/env bash
# Build llama.cpp's own llama-bench, llama-batched-bench, llama-completion and llama-server,
# outside the repo: the benchmark comparisons in the README (`make bench-ref`, `make
# bench-serve`), and the reference output that tests/control_vector.rs compares
# `generate --control-vector` against.
#
# The llama.cpp vendored by our pinned llama-cpp-sys-2 0.1.161 ships without the tools/ sources,
# so we take llama.cpp from the llama-cpp-python sdist on PyPI whose vendor/llama.cpp is closest:
# llama-cpp-python 0.3.36 (llama.cpp 0c1e57098, ggml 0.25.3). The crate's copy is a few upstream
# commits newer (ggml 0.26.0); include/llama.h differs only in LLAMA_SESSION_VERSION (11 vs 10)
# and LLAMA_STATE_SEQ_VERSION (4 vs 3) -- same public API (load_mtp, n_rs_seq,
# llama_set_adapter_cvec, ...).
#
# Built for the same instruction set as persona-gate (scripts/cpu-flags.sh, ISA=native by
# default): the same -march level and the same GGML_AVX* options llama-cpp-sys-2 derives from
# the Rust target features, so the two are compared on equal kernels.
#
# Usage: [LLAMA_REF_SERVER=1] scripts/build-llama-ref.sh [--built]
# LLAMA_REF_SERVER=1 also builds llama-server (for `make bench-serve`).
#
# Idempotent: download, unpack, configure and build are each skipped when already done.
# Progress goes to stderr; stdout is only the bin directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

lcp_ver=0.3.36
cache="${XDG_CACHE_HOME:-$HOME/.cache}/persona-gate"
dl="$cache/sdist"
tarball="$dl/llama_cpp_python-$lcp_ver.tar.gz"
srcroot="$cache/llama-cpp-python-$lcp_ver"
src="$srcroot/vendor/llama.cpp"
rustflags="${RUSTFLAGS:-$(ISA="${ISA:-native}" "$here/cpu-flags.sh")}"
march=$(printf '%s\n' "$rustflags" | sed -n 's/.*target-cpu=\([^ ]*\).*/\1/p')
feats=$(printf '%s\n' "$rustflags" | sed -n 's/.*target-feature=\([^ ]*\).*/\1/p')
isa_opts=(-DGGML_NATIVE=OFF)
tag="${march:-default}"
if [ -n "$march" ]; then
  isa_opts+=("-DCMAKE_C_FLAGS=-march=$march" "-DCMAKE_CXX_FLAGS=-march=$march")
fi
# The options llama-cpp-sys-2's build.rs sets for the features the level implies or names.
case "$march" in
  x86-64-v3|x86-64-v4) isa_opts+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON) ;;
esac
for f in ${feats//,/ }; do
  case "$f" in
    +avx512vnni) isa_opts+=(-DGGML_AVX512_VNNI=ON); tag="$tag-vnni" ;;
    +avx512bf16) isa_opts+=(-DGGML_AVX512_BF16=ON); tag="$tag-bf16" ;;
    +avx512vbmi) isa_opts+=(-DGGML_AVX512_VBMI=ON); tag="$tag-vbmi" ;;
    +avxvnni) isa_opts+=(-DGGML_AVX_VNNI=ON); tag="$tag-avxvnni" ;;
  esac
done
build="$cache/llama-ref-lcp$lcp_ver-$tag"
bin="$build/bin"
jobs="${JOBS:-2}"

log() { echo "build-llama-ref: $*" >&2; }

# --built: print the bin directory if the tools are already built for this instruction set,
# else exit 3 without building (tests use it to find llama-completion or skip).
if [ "${1:-}" = --built ]; then
  [ -x "$bin/llama-completion" ] && [ -x "$bin/llama-bench" ] && { echo "$bin"; exit 0; }
  exit 3
fi

mkdir -p "$dl"

if [ ! -f "$tarball" ]; then
  log "downloading llama-cpp-python==$lcp_ver sdist"
  python3 -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$lcp_ver" -d "$dl" >&2
fi

if [ ! -f "$src/tools/llama-bench/llama-bench.cpp" ]; then
  log "unpacking $tarball"
  tmp="$srcroot.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  tar -xzf "$tarball" -C "$tmp" --strip-components=1
  rm -rf "$srcroot"
  mv "$tmp" "$srcroot"
fi

if [ ! -f "$build/CMakeCache.txt" ]; then
  log "configuring $src -> $build"
  cmake -S "$src" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release \
    "${isa_opts[@]}" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
fi

if [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-batched-bench" ] || [ ! -x "$bin/llama-completion" ]; then
  log "building llama-bench, llama-batched-bench and llama-completion (-j$jobs)"
  cmake --build "$build" --config Release -j"$jobs" --target llama-bench llama-batched-bench llama-completion >&2
fi
# llama-server only for the serving benchmark (a build configured before it was added
# needs -DLLAMA_BUILD_SERVER=ON: reconfigure in place).
if [ "${LLAMA_REF_SERVER:-0}" = 1 ] && [ ! -x "$bin/llama-server" ]; then
  grep -q '^LLAMA_BUILD_SERVER:BOOL=ON' "$build/CMakeCache.txt" || cmake -S "$src" -B "$build" -DLLAMA_BUILD_SERVER=ON >&2
  log "building llama-server (-j$jobs)"
  cmake --build "$build" --config Release -j"$jobs" --target llama-server >&2
fi

echo "$bin"
