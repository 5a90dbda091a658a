#!/usr/bin/env bash
# Install what a fresh machine lacks to build persona-gate: cmake (llama.cpp's build) and
# libclang (bindgen, which generates the llama.cpp bindings). Debian/Ubuntu via apt-get, macOS
# via Homebrew. `scripts/setup.sh test` also installs what the browser tests drive: Chromium
# and chromedriver (Debian's chromium and chromium-driver; on macOS it prints a hint).
# `scripts/setup.sh lint` installs what `make lint` needs besides: jq (scripts/check-msrv.sh)
# and cargo-deny (cargo install --locked: several minutes of compiling, once).
# Prints nothing when everything is present.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
if ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' && [ -z "${LIBCLANG_PATH:-}" ]; then
  need+=(libclang-dev clang)
fi
command -v c++ >/dev/null || need+=(g++)
browser=()
if [ "${1:-}" = test ]; then
  # Where tests/common/browser.rs looks for them by default.
  [ -x /usr/bin/chromium ] || browser+=(chromium)
  command -v chromedriver >/dev/null || [ -x /usr/bin/chromedriver ] || browser+=(chromium-driver)
fi
if [ "${1:-}" = lint ]; then
  command -v jq >/dev/null || need+=(jq)
  if ! ${CARGO:-cargo} deny --version >/dev/null 2>&1; then
    echo "setup: installing cargo-deny (cargo install --locked, several minutes)" >&2
    ${CARGO:-cargo} install cargo-deny --locked --quiet
  fi
fi
[ $((${#need[@]} + ${#browser[@]})) -eq 0 ] && exit 0
if command -v apt-get >/dev/null; then
  [ ${#browser[@]} -gt 0 ] && need+=("${browser[@]}")
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v brew >/dev/null; then
  build=0
  for p in ${need[@]+"${need[@]}"}; do [ "$p" = jq ] && brew install jq || build=1; done
  [ $build -eq 0 ] || brew install cmake llvm
  if [ ${#browser[@]} -gt 0 ]; then
    echo "setup: the browser tests need Chromium and chromedriver: brew install --cask chromium" \
      "chromedriver, then set PERSONA_GATE_CHROMIUM to the Chromium binary" >&2
  fi
else
  echo "setup: please install: ${need[*]-} ${browser[*]-}" >&2; exit 1
fi
