#!/usr/bin/env bash
# Checks the Debian packages that bin/package built: for each major, the file list (the library,
# the control and SQL files and the two scripts in that major's directories, the documentation,
# nothing else: nothing under /opt or from target/), the metadata (Package, Version from
# Cargo.toml, Architecture, Depends on postgresql-N and the linked libraries), the control file's
# default_version, the libraries the extension links, and lintian.
#
#   tests/package_files.sh [--dir DIR] [MAJOR...]   (default: target/debian, 14 15 16 17 18)
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/debian
majors=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    *) majors+=("$1"); shift ;;
  esac
done
[ ${#majors[@]} -gt 0 ] || majors=(14 15 16 17 18)

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
passed=0 failed=0
check() { # check WHAT COMMAND...: one line per check
  local what=$1; shift
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "package_files: FAILED: $what" >&2; fi
}
same() { [ "$1" = "$2" ] || { echo "  expected '$2'" >&2; echo "  got      '$1'" >&2; return 1; }; }
matches() { grep -Eq "$2" <<<"$1" || { echo "  '$1' does not match /$2/" >&2; return 1; }; }
lacks() { ! grep -Eq "$2" <<<"$1" || { echo "  found /$2/ in: $(grep -E "$2" <<<"$1" | head -3)" >&2; return 1; }; }

# The major a library was built for: the version in the Pg_magic_struct that its Pg_magic_func
# returns (PG_VERSION_NUM / 100, the int after the struct's length), read without loading it.
magic_version() {
  local fn addr word
  fn=$(objdump -T "$1" | awk '$NF == "Pg_magic_func" { print $1 }')
  [ -n "$fn" ] || return 0
  addr=$(objdump -d --start-address="0x$fn" --stop-address="$(printf '0x%x' $((16#$fn + 32)))" "$1" \
    | sed -n 's/.*lea .*(%rip),%rax *# \([0-9a-f]*\) .*/\1/p' | head -1)
  [ -n "$addr" ] || return 0
  word=$(objdump -s --start-address="0x$addr" --stop-address="$(printf '0x%x' $((16#$addr + 8)))" "$1" \
    | sed -n 's/^ [0-9a-f]* [0-9a-f]* \([0-9a-f]*\).*/\1/p')
  [ ${#word} = 8 ] || return 0
  echo $((16#${word:6:2}${word:4:2}${word:2:2}${word:0:2}))
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for major in "${majors[@]}"; do
  pkg="postgresql-$major-pg-keeper-rs"
  debs=("$dir/${pkg}_$version-"*"_$arch.deb")
  if [ ! -f "${debs[0]}" ] || [ ${#debs[@]} -ne 1 ]; then
    check "$pkg: exactly one ${pkg}_$version-*_$arch.deb in $dir" false
    continue
  fi
  deb=${debs[0]}
  echo "package_files: $deb"

  field() { dpkg-deb -f "$deb" "$1"; }
  check "$pkg: Package" same "$(field Package)" "$pkg"
  check "$pkg: Version is Cargo.toml's plus a Debian revision" matches "$(field Version)" "^$version-[0-9]+$"
  check "$pkg: Architecture" same "$(field Architecture)" "$arch"
  depends=$(field Depends)
  check "$pkg: Depends on postgresql-$major" matches "$depends" "(^|, )postgresql-$major(,|$)"
  for lib in libc6 libpq5 libgcc-s1; do
    check "$pkg: Depends on $lib with a version" matches "$depends" "(^|, )$lib \\(>= [^)]+\\)"
  done
  other=$(sed -E "s/(^|, )postgresql-$major(,|$)/\\1\\2/" <<<"$depends")
  check "$pkg: Depends on no other major" lacks "$other" "postgresql"
  check "$pkg: Maintainer" matches "$(field Maintainer)" "^[^<]+ <[^@>]+@[^>]+>$"
  check "$pkg: Section" same "$(field Section)" database
  check "$pkg: Priority" same "$(field Priority)" optional
  check "$pkg: Description names the major" matches "$(field Description | head -1)" "PostgreSQL $major "
  check "$pkg: no Homepage" same "$(field Homepage)" ""

  # The file list: modes, owner and paths.
  listing=$(dpkg-deb -c "$deb")
  files=$(awk '$1 !~ /^d/ { print $1, $2, $6 }' <<<"$listing" | sort)
  expected=$(sort <<EOF
-rw-r--r-- root/root ./usr/lib/postgresql/$major/lib/pg_keeper_rs.so
-rw-r--r-- root/root ./usr/share/postgresql/$major/extension/pg_keeper_rs.control
-rw-r--r-- root/root ./usr/share/postgresql/$major/extension/pg_keeper_rs--$version.sql
-rwxr-xr-x root/root ./usr/lib/postgresql/$major/bin/pg_keeper_rejoin
-rwxr-xr-x root/root ./usr/lib/postgresql/$major/bin/pg_keeper_switchover
-rw-r--r-- root/root ./usr/share/doc/$pkg/copyright
-rw-r--r-- root/root ./usr/share/doc/$pkg/changelog.Debian.gz
-rw-r--r-- root/root ./usr/share/doc/$pkg/README.md.gz
EOF
)
  check "$pkg: the files, their modes and owner" same "$files" "$expected"
  check "$pkg: nothing under /opt or target/" lacks "$listing" "\./opt/|target/"
  check "$pkg: directories owned by root" lacks "$(awk '$1 ~ /^d/ { print $2 }' <<<"$listing")" "^[^r]|^r[^o]"

  # The contents.
  x="$work/$major"
  dpkg-deb -x "$deb" "$x"
  control="$x/usr/share/postgresql/$major/extension/pg_keeper_rs.control"
  check "$pkg: default_version is Cargo.toml's" same \
    "$(sed -n "s/^default_version = '\(.*\)'$/\1/p" "$control")" "$version"
  check "$pkg: module_pathname" same "$(sed -n "s/^module_pathname = '\(.*\)'$/\1/p" "$control")" '$libdir/pg_keeper_rs'
  check "$pkg: the SQL creates the status view" grep -q 'CREATE VIEW pg_keeper_status' \
    "$x/usr/share/postgresql/$major/extension/pg_keeper_rs--$version.sql"
  so="$x/usr/lib/postgresql/$major/lib/pg_keeper_rs.so"
  needed=$(objdump -p "$so" | awk '$1 == "NEEDED" { print $2 }' | sort | tr '\n' ' ')
  check "$pkg: the library links libc, libgcc_s and libpq only" same "$needed" \
    "ld-linux-x86-64.so.2 libc.so.6 libgcc_s.so.1 libpq.so.5 "
  check "$pkg: the library is stripped" lacks "$(objdump -h "$so")" "\.symtab|\.debug_"
  check "$pkg: the library's magic block is PostgreSQL $major's" same "$(magic_version "$so")" "${major}00"
  check "$pkg: pg_keeper_rejoin is bin/rejoin" cmp -s "$x/usr/lib/postgresql/$major/bin/pg_keeper_rejoin" bin/rejoin
  check "$pkg: pg_keeper_switchover is bin/switchover" cmp -s "$x/usr/lib/postgresql/$major/bin/pg_keeper_switchover" bin/switchover
  # Installed beside a major's programs, the scripts run those (PGBIN is the directory they are
  # in): stand-ins there record that they ran (pg_ctl: no server running; psql: cannot connect).
  fake="$work/bin-$major"
  mkdir -p "$fake/data"
  echo "$major" >"$fake/data/PG_VERSION"
  cp -p "$x/usr/lib/postgresql/$major/bin/"pg_keeper_* "$fake/"
  printf '#!/bin/sh\nexit 3\n' >"$fake/pg_ctl"
  printf '#!/bin/sh\necho "$0" >>"%s/ran"\nexit 2\n' "$fake" >"$fake/psql"
  chmod 0755 "$fake/pg_ctl" "$fake/psql"
  env -u PGBIN "$fake/pg_keeper_rejoin" --datadir "$fake/data" --primary 'host=127.0.0.1 port=1' \
    --name node1 >/dev/null 2>&1 || true
  env -u PGBIN "$fake/pg_keeper_switchover" --datadir "$fake/data" --primary 'host=127.0.0.1 port=1' \
    --standby 'host=127.0.0.1 port=2' --name node1 >/dev/null 2>&1 || true
  check "$pkg: the scripts run the psql beside them" same "$(cat "$fake/ran" 2>/dev/null)" "$fake/psql
$fake/psql"
  check "$pkg: the copyright file names the license" grep -q '^License: PostgreSQL$' "$x/usr/share/doc/$pkg/copyright"
  check "$pkg: the changelog has this version" matches "$(zcat "$x/usr/share/doc/$pkg/changelog.Debian.gz" | head -1)" \
    "^pg-keeper-rs \\($version-[0-9]+\\) "
  if command -v lintian >/dev/null; then
    # Not an upload to Debian: there is no ITP bug to close.
    check "$pkg: lintian" lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs "$deb"
  fi
done

echo "package_files: $passed passed, $failed failed"
[ "$failed" = 0 ]
