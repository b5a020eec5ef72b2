#!/usr/bin/env bash
# Plain-SQL insert throughput, one trade per transaction, with and without the
# trigger's NOTIFY, at 1 and 32 connections (pgbench). A broadcaster LISTENs
# during the runs, as in production. A benchmark, not a test: `make bench-sql`.
#
# Usage: bench/sql-inserts.sh [seconds-per-run, default 10] [runs, default 3]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-10}
runs=${2:-3}
export PGDEV_DIR=/tmp/marketcast-bench-sql-pg
url=$(bin/pg-dev start | tail -n1 | cut -d= -f2-)
trap 'kill "${bpid:-}" 2>/dev/null || true; bin/pg-dev stop --wipe >/dev/null 2>&1 || true' EXIT
bin=target/release/marketcast
[[ -x $bin ]] || bin=target/debug/marketcast
[[ -x $bin ]] || { cargo build --release >&2; bin=target/release/marketcast; }
pgbin=$(dirname "$(readlink -f "$(command -v pg_ctl 2>/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl | tail -1)")")
pgbench=$pgbin/pgbench

for db in mc_bench_notify mc_bench_plain; do
  psql -q "$url" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  u=${url%/*}/$db
  "$bin" migrate --database-url "$u" >/dev/null 2>&1
  psql -q "$u" -c "INSERT INTO markets (id) SELECT 'm' || g FROM generate_series(0, 63) g"
done
# The same trigger without its pg_notify: what the seq design costs by itself.
psql -q "${url%/*}/mc_bench_plain" -At -c \
  "SELECT regexp_replace(pg_get_functiondef('marketcast_trade_assign'::regproc), 'PERFORM pg_notify\(.*?\);', '', 's')" \
  | psql -q "${url%/*}/mc_bench_plain"

"$bin" broadcaster --database-url "${url%/*}/mc_bench_notify" --listen 127.0.0.1:0 >/dev/null 2>&1 &
bpid=$!
script=$(mktemp)
echo "INSERT INTO trades (market_id, side, price, qty) VALUES ('m' || (random() * 63)::int, 'yes', 0.5, 1);" > "$script"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
printf '%-8s %-8s %10s   (median of %s runs of %ss)\n' variant clients tps "$runs" "$secs"
for c in 1 32; do
  for variant in notify plain; do
    for ((r = 0; r < runs; r++)); do
      "$pgbench" -n -M prepared -c "$c" -j 2 -T "$secs" -f "$script" "${url%/*}/mc_bench_$variant" 2>/dev/null \
        | awk '/^tps/ {print int($3)}'
    done | median | xargs printf '%-8s %-8s %10s\n' "$variant" "$c"
  done
done
