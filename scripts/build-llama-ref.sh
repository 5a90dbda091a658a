#!/usr/bin/env bash
# Build llama.cpp's own llama-bench and llama-batched-bench from the very llama.cpp source that
# our pinned llama-cpp-sys-2 vendors (same version), outside the repo, for the benchmark
# comparison in the README. GGML_NATIVE=ON is llama.cpp's default best build for this machine.
set -euo pipefail
ver=0.1.161
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-$ver/llama.cpp 2>/dev/null | head -1)
[ -n "$src" ] || { cargo fetch >/dev/null; src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-$ver/llama.cpp | head -1); }
out="${XDG_CACHE_HOME:-$HOME/.cache}/persona-gate/llama-ref-${1:-native}"
native=ON; [ "${1:-native}" = v3 ] && native=OFF
extra=(); [ "$native" = OFF ] && extra=(-DCMAKE_C_FLAGS=-march=x86-64-v3 -DCMAKE_CXX_FLAGS=-march=x86-64-v3)
cmake -S "$src" -B "$out" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=$native -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF "${extra[@]}" >/dev/null
cmake --build "$out" -j"$(nproc)" --target llama-bench llama-batched-bench >/dev/null
echo "$out/bin"
