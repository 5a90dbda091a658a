#!/usr/bin/env bash
# Install what a fresh machine lacks to build persona-gate: cmake (llama.cpp's build) and
# libclang (bindgen, which generates the llama.cpp bindings). Debian/Ubuntu via apt-get, macOS
# via Homebrew. Prints nothing when everything is present.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
if ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' && [ -z "${LIBCLANG_PATH:-}" ]; then
  need+=(libclang-dev clang)
fi
command -v c++ >/dev/null || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v brew >/dev/null; then
  brew install cmake llvm
else
  echo "setup: please install: ${need[*]}" >&2; exit 1
fi
