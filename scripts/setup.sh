#!/usr/bin/env bash
# Install what a fresh machine lacks to build persona-gate: cmake (llama.cpp's build) and
# libclang (bindgen, which generates the llama.cpp bindings). Debian/Ubuntu via apt-get, macOS
# via Homebrew. `scripts/setup.sh test` also installs what the browser tests drive: Chromium
# and chromedriver (Debian's chromium and chromium-driver; on macOS it prints a hint).
# It also makes a Python virtual environment with numpy and safetensors for the test that reads
# our direction files back in Python (tests/imports.rs) and the official openai client for the
# server tests (tests/serve.rs), in ~/.cache/persona-gate/python, and installs curl.
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
pyenv="$HOME/.cache/persona-gate/python"
pyneed=0
if [ "${1:-}" = test ]; then
  command -v curl >/dev/null || need+=(curl)
  if ! "$pyenv/bin/python3" -c 'import safetensors, numpy, openai' >/dev/null 2>&1; then
    pyneed=1
    command -v python3 >/dev/null || need+=(python3)
    # Debian's python3 makes virtual environments only with python3-venv.
    if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
      need+=(python3-venv)
    fi
  fi
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
python_env() {
  [ "$pyneed" -eq 1 ] || return 0
  echo "setup: making $pyenv with numpy, safetensors and openai (the Python tests)" >&2
  python3 -m venv "$pyenv"
  "$pyenv/bin/python3" -m pip install --quiet --disable-pip-version-check numpy safetensors openai
}
if [ $((${#need[@]} + ${#browser[@]})) -eq 0 ]; then
  python_env
  exit 0
fi
if command -v apt-get >/dev/null; then
  [ ${#browser[@]} -gt 0 ] && need+=("${browser[@]}")
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v brew >/dev/null; then
  build=0
  for p in ${need[@]+"${need[@]}"}; do
    case $p in jq) brew install jq ;; python3) brew install python ;; *) build=1 ;; esac
  done
  [ $build -eq 0 ] || brew install cmake llvm
  if [ ${#browser[@]} -gt 0 ]; then
    echo "setup: the browser tests need Chromium and chromedriver: brew install --cask chromium" \
      "chromedriver, then set PERSONA_GATE_CHROMIUM to the Chromium binary" >&2
  fi
else
  echo "setup: please install: ${need[*]-} ${browser[*]-}" >&2; exit 1
fi
python_env
