#!/usr/bin/env bash
# Installs the PostgreSQL 15 Debian package (bin/package 15) on this machine and runs a protected
# pair from it with no Rust toolchain on the PATH: both keepers connected, rows written, kill -9
# of the primary's postmaster, the standby promoted with every row, the old primary rejoined as a
# standby by the packaged pg_keeper_rejoin, both keepers connected again. Then purges the package
# and installs the source build again (cargo pgrx install, as bin/setup does), also on failure.
# Run as root. It replaces the system PostgreSQL 15's pg_keeper_rs while it runs.
#
#   tests/package.sh [DEB]   (default: target/debian/postgresql-15-pg-keeper-rs_<version>-*.deb)
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)
pkg=postgresql-15-pg-keeper-rs
BIN=/usr/lib/postgresql/15/bin
lib=/usr/lib/postgresql/15/lib/pg_keeper_rs.so
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
say() { echo "package.sh: $*"; }
fail() { echo "package.sh: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# The pair, run as `env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin bash tests/package.sh --pair`.
if [ "${1:-}" = --pair ]; then
  for tool in cargo rustc rustup cargo-pgrx; do
    if command -v "$tool" >/dev/null; then fail "$tool is on the PATH ($(command -v "$tool"))"; fi
  done
  [ -z "${PGBIN:-}" ] || fail "PGBIN is set"
  say "no cargo, rustc or rustup on the PATH ($PATH)"

  # Three free ports on 127.0.0.1.
  ports=()
  while [ ${#ports[@]} -lt 3 ]; do
    p=$(shuf -i 20000-60000 -n 1)
    [[ " ${ports[*]} " == *" $p "* ]] && continue
    [ -z "$(ss -Htln "sport = :$p")" ] && ports+=("$p")
  done
  dir=$(mktemp -d /tmp/pg_keeper_rs_package.XXXXXX)
  chmod 755 "$dir"
  demo=$dir/demo
  stop_all() {
    for d in "$demo/node1" "$demo/node2" "$demo/witness"; do
      [ -f "$d/postmaster.pid" ] || continue
      pm=$(head -1 "$d/postmaster.pid")
      runuser -u postgres -- "$BIN/pg_ctl" -D "$d" -m immediate -t 30 stop >/dev/null 2>&1 \
        || kill -9 "$pm" 2>/dev/null || true
    done
    rm -rf "$dir"
  }
  trap stop_all EXIT

  psql_at() { timeout 20 "$BIN/psql" -X -h 127.0.0.1 -p "$1" -U postgres -d postgres -Atq -c "$2" 2>/dev/null; }
  title_of() { # the keeper's process title of node N, or nothing
    local pidfile="$demo/node$1/postmaster.pid"
    [ -f "$pidfile" ] || return 0
    ps -o args= --ppid "$(head -1 "$pidfile")" 2>/dev/null | grep 'pg_keeper (' || true
  }
  wait_for() { # wait_for SECONDS WHAT CONDITION...
    local limit=$1 what=$2 start=$SECONDS; shift 2
    until "$@"; do
      [ $((SECONDS - start)) -lt "$limit" ] || fail "$what: not within ${limit}s (node1: '$(title_of 1)', node2: '$(title_of 2)')"
      sleep 0.5
    done
    say "$what ($((SECONDS - start))s)"
  }
  titles_are() { title_of 1 | grep -qF "pg_keeper ($1)" && title_of 2 | grep -qF "pg_keeper ($2)"; }
  P1=${ports[0]} P2=${ports[1]}

  # bin/demo's pair: node1 primary, node2 its synchronous standby, a witness; the extension is the
  # one the package installed (PG_KEEPER_SKIP_SETUP: no bin/setup, so no build).
  PG_KEEPER_SKIP_SETUP=1 PG_KEEPER_DEMO_DIR=$demo PG_KEEPER_DEMO_PORT1=$P1 PG_KEEPER_DEMO_PORT2=$P2 \
    PG_KEEPER_DEMO_PORTW=${ports[2]} timeout 300 bash bin/demo start >"$dir/demo.out" 2>&1 \
    || { cat "$dir/demo.out"; fail "bin/demo start"; }
  wait_for 60 "both keepers connected" titles_are "master mode:connected" "standby mode:connected"
  sync_standby() {
    [ "$(psql_at "$P1" "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'node2'")" = sync ]
  }
  wait_for 30 "node2 is the synchronous standby" sync_standby
  # The standby promotes only once it has heard from the primary's keeper that it trusts it as
  # its synchronous standby (README "Guarantees"): wait for that, then two heartbeats (2 s each).
  trusted() {
    [ "$(psql_at "$P1" "SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_keeper'")" \
      = "pg_keeper: trusts as synchronous standby: node2" ]
  }
  wait_for 30 "node1's keeper trusts node2 as its synchronous standby" trusted
  sleep 5
  [ "$(psql_at "$P1" "SELECT extversion FROM pg_extension WHERE extname = 'pg_keeper_rs'")" = "$version" ] \
    || fail "CREATE EXTENSION pg_keeper_rs did not make version $version"
  keeper=$(ps -o pid=,args= --ppid "$(head -1 "$demo/node1/postmaster.pid")" | awk '/pg_keeper \(/ { print $1 }')
  grep -q " $lib\$" "/proc/$keeper/maps" || fail "the keeper (pid $keeper) did not load $lib"
  say "the keeper (pid $keeper) runs $lib"

  psql_at "$P1" "CREATE TABLE package_rows (i int PRIMARY KEY); INSERT INTO package_rows SELECT generate_series(1, 1000)" \
    >/dev/null || fail "could not write rows on node1"
  say "1000 rows committed on node1 (synchronously replicated)"

  pm=$(head -1 "$demo/node1/postmaster.pid")
  kill -9 "$pm"
  say "kill -9 of node1's postmaster (pid $pm)"
  promoted() {
    [ "$(psql_at "$P2" 'SELECT pg_is_in_recovery()')" = f ] && title_of 2 | grep -qF 'pg_keeper (master mode'
  }
  wait_for 60 "node2 promoted (pg_is_in_recovery() = f, title master mode)" promoted
  rows=$(psql_at "$P2" "SELECT count(*) FROM package_rows")
  [ "$rows" = 1000 ] || fail "node2 has $rows rows, not 1000"
  say "node2 has every row (1000)"

  # node1's processes end when they notice the postmaster is gone; pg_rewind needs them gone.
  node1_gone() { ! ps -eo args= | grep -q '^postgres: node1: '; }
  wait_for 30 "node1's processes ended" node1_gone
  timeout 300 "$BIN/pg_keeper_rejoin" --datadir "$demo/node1" \
    --primary "host=127.0.0.1 port=$P2 dbname=postgres user=postgres" --name node1 --log "$demo/node1.log" \
    || fail "pg_keeper_rejoin"
  wait_for 60 "both keepers connected again, node2 primary" titles_are "standby mode:connected" "master mode:connected"
  [ "$(psql_at "$P1" 'SELECT pg_is_in_recovery()')" = t ] || fail "node1 is not in recovery"
  rows=$(psql_at "$P1" "SELECT count(*) FROM package_rows")
  [ "$rows" = 1000 ] || fail "node1 (standby) has $rows rows, not 1000"
  say "node1 is node2's standby with every row"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || fail "run as root (it installs a package)"
deb=${1:-}
if [ -z "$deb" ]; then
  debs=(target/debian/"${pkg}_$version"-*_"$(dpkg --print-architecture)".deb)
  [ -f "${debs[0]}" ] || fail "no ${debs[0]}; run bin/package 15 first"
  deb=${debs[-1]}
fi
[ -f "$deb" ] || fail "no $deb"
deb=$(readlink -f "$deb")

restore() {
  local rc=$?
  if dpkg -s "$pkg" >/dev/null 2>&1; then apt-get purge -y -qq "$pkg" >/dev/null || rc=1; fi
  say "installing the source build again (cargo pgrx install, as bin/setup does)"
  (cd "$src" && cargo pgrx install --release --pg-config "$BIN/pg_config" >/dev/null) || rc=1
  if [ "$rc" = 0 ]; then say "1 passed, 0 failed"; else say "0 passed, 1 failed"; fi
  exit "$rc"
}
trap restore EXIT

say "apt-get install $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >/dev/null
[ "$(dpkg-query -W -f='${Status} ${Version}' "$pkg")" = "install ok installed $(dpkg-deb -f "$deb" Version)" ] \
  || fail "$pkg is not installed"
for f in "$lib" /usr/share/postgresql/15/extension/pg_keeper_rs.control \
  "/usr/share/postgresql/15/extension/pg_keeper_rs--$version.sql" "$BIN/pg_keeper_rejoin" "$BIN/pg_keeper_switchover"; do
  [ "$(dpkg -S "$f" 2>/dev/null | cut -d: -f1)" = "$pkg" ] || fail "$f is not owned by $pkg"
done
[ -z "$(dpkg --verify "$pkg")" ] || fail "dpkg --verify $pkg: $(dpkg --verify "$pkg")"
say "$pkg owns the library, the control and SQL files and the scripts (dpkg -S), unchanged (dpkg --verify)"

env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 bash "$src/tests/package.sh" --pair

apt-get purge -y -qq "$pkg" >/dev/null
for f in "$lib" "$BIN/pg_keeper_rejoin"; do [ ! -e "$f" ] || fail "$f is still there after the purge"; done
say "purged: the library and the scripts are gone"
