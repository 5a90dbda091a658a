#!/usr/bin/env bash
# Does persona-gate build with its declared rust-version (Cargo.toml's `rust-version`)?
#
# With that toolchain installed (rustup toolchain install X.Y), this is the real check:
# `cargo +X.Y check --locked --all-targets`. Without it (this project's machines have one
# toolchain and cannot fetch another), three checks that together cover what can be checked
# without the old compiler, and say so:
#   1. the declared version is not newer than the installed rustc (cargo itself then refuses
#      to build, so the claim would be untestable);
#   2. every locked dependency's own rust-version is at most ours (a dependency that needs a
#      newer compiler makes the claim false whatever our code does);
#   3. our code uses no std API stabilised after it: clippy's incompatible_msrv lint, on by
#      default and fatal under `make lint`'s -D warnings, reads rust-version from Cargo.toml.
# Not covered without the toolchain: language features (syntax) newer than the declared
# version. Needs jq (scripts/setup.sh lint installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
meta=$($CARGO metadata --format-version 1 --locked --filter-platform "$(rustc -vV | sed -n 's/^host: //p')")
msrv=$(jq -r '.packages[] | select(.name == "persona-gate") | .rust_version // empty' <<<"$meta")
[ -n "$msrv" ] || { echo "check-msrv: Cargo.toml has no rust-version" >&2; exit 1; }
# Version compare: is $1 <= $2 (dotted numbers, missing parts 0)?
le() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$1" ]; }
if command -v rustup >/dev/null && rustup run "$msrv" rustc --version >/dev/null 2>&1; then
  echo "check-msrv: building with Rust $msrv itself"
  exec $CARGO "+$msrv" check --locked --all-targets
fi
have=$(rustc --version | awk '{print $2}')
le "$msrv" "$have" || { echo "check-msrv: rust-version $msrv is newer than the installed rustc $have" >&2; exit 1; }
# Packages of the resolved graph for this host (build dependencies included).
ids=$(jq -r '.resolve.nodes[].id' <<<"$meta")
bad=$(jq -r --arg ids "$ids" '($ids | split("\n")) as $keep
  | .packages[] | select(.id as $i | $keep | index($i)) | select(.rust_version != null)
  | "\(.name) \(.version) \(.rust_version)"' <<<"$meta" |
  while read -r name ver rv; do le "$rv" "$msrv" || echo "$name $ver needs Rust $rv"; done)
if [ -n "$bad" ]; then
  echo "check-msrv: dependencies newer than rust-version $msrv: $(echo "$bad" | paste -sd, -)" >&2
  exit 1
fi
n=$(wc -l <<<"$ids")
top=$(jq -r '[.packages[] | select(.name != "persona-gate") | .rust_version // empty] | max_by(split(".") | map(tonumber))' <<<"$meta")
echo "check-msrv: rust-version $msrv (installed $have, Rust $msrv itself not installed): $n locked packages need at most Rust $top; std APIs are checked by clippy's incompatible_msrv"
