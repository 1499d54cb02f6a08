#!/usr/bin/env bash
# `cargo install` of the three binaries into a throwaway root, then what a new user runs
# first: each binary's --version and `mesh-client demo` (which starts mesh-bootstrap and
# mesh-node from beside itself, so it also proves they land together).
#
#   scripts/check-install.sh            # debug build, reusing ./target (fast)
#   RELEASE=1 scripts/check-install.sh  # release build, as users install
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
profile=(--debug)
[[ "${RELEASE:-}" == 1 ]] && profile=()
for crate in mesh-node mesh-client mesh-bootstrap; do
  cargo install --locked "${profile[@]}" --path "$crate" --root "$root" --target-dir target
done
for bin in mesh-node mesh-client mesh-bootstrap; do
  "$root/bin/$bin" --version
done
"$root/bin/mesh-client" demo --max-tokens 12 --temperature 0
echo "install check passed: $root/bin holds mesh-node, mesh-client and mesh-bootstrap"
