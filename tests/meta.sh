#!/usr/bin/env bash
# Checks META.json, the PGXN distribution metadata: it validates with the PGXN maintainers'
# validator (pgxn_meta, installed by bin/setup), which also refuses a broken copy of it; its
# version and the extension's are Cargo.toml's; the control file takes its version from Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0 failed=0
check() { # check WHAT COMMAND...
  local what=$1; shift
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "meta: FAILED: $what" >&2; fi
}
same() { [ "$1" = "$2" ] || { echo "  expected '$2', got '$1'" >&2; return 1; }; }
json() { # json KEY...: the value at that path in META.json
  python3 -c 'import functools, json, sys; print(functools.reduce(lambda m, k: m[k], sys.argv[1:], json.load(open("META.json"))))' "$@"
}

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
command -v pgxn_meta >/dev/null || { echo "meta: pgxn_meta is not installed (bin/setup installs it)" >&2; exit 1; }
check "pgxn_meta META.json" pgxn_meta META.json
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The validator is not one that accepts anything: META.json without its license is refused.
python3 -c 'import json, sys; m = json.load(open("META.json")); del m["license"]; json.dump(m, open(sys.argv[1], "w"))' \
  "$work/META.json"
check "pgxn_meta refuses META.json without a license" bash -c "! pgxn_meta '$work/META.json' >/dev/null 2>&1"
check "META.json's version is Cargo.toml's" same "$(json version)" "$version"
check "the extension's version in META.json is Cargo.toml's" same "$(json provides pg_keeper_rs version)" "$version"
check "META.json's name is the extension's" same "$(json name)" pg_keeper_rs
check "the control file's default_version is Cargo.toml's (cargo pgrx fills it in)" same \
  "$(sed -n "s/^default_version = '\(.*\)'$/\1/p" pg_keeper_rs.control)" "@CARGO_VERSION@"
check "META.json's license is Cargo.toml's" same "$(json license)" \
  "$(sed -n 's/^license = "\(.*\)"$/\1/p' Cargo.toml | tr '[:upper:]' '[:lower:]')"

echo "meta: $passed passed, $failed failed"
[ "$failed" = 0 ]
