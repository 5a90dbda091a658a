#!/usr/bin/env bash
# Build llama.cpp's own llama-bench and llama-batched-bench, outside the repo, for the benchmark
# comparison in the README (`make bench-ref`).
#
# The llama.cpp vendored by our pinned llama-cpp-sys-2 0.1.161 ships without the tools/ sources,
# so we take llama.cpp from the llama-cpp-python sdist on PyPI whose vendor/llama.cpp is closest:
# llama-cpp-python 0.3.36 (llama.cpp 0c1e57098, ggml 0.25.3). The crate's copy is a few upstream
# commits newer (ggml 0.26.0); include/llama.h differs only in LLAMA_SESSION_VERSION (11 vs 10)
# and LLAMA_STATE_SEQ_VERSION (4 vs 3) -- same public API (load_mtp, n_rs_seq,
# llama_set_adapter_cvec, ...).
#
# Idempotent: download, unpack, configure and build are each skipped when already done.
# Progress goes to stderr; stdout is only the bin directory.
set -euo pipefail

lcp_ver=0.3.36
cache="${XDG_CACHE_HOME:-$HOME/.cache}/persona-gate"
dl="$cache/sdist"
tarball="$dl/llama_cpp_python-$lcp_ver.tar.gz"
srcroot="$cache/llama-cpp-python-$lcp_ver"
src="$srcroot/vendor/llama.cpp"
build="$cache/llama-ref-lcp$lcp_ver-native"
bin="$build/bin"
jobs="${JOBS:-2}"

log() { echo "build-llama-ref: $*" >&2; }

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
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
fi

if [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-batched-bench" ]; then
  log "building llama-bench and llama-batched-bench (-j$jobs)"
  cmake --build "$build" --config Release -j"$jobs" --target llama-bench llama-batched-bench >&2
fi

echo "$bin"
