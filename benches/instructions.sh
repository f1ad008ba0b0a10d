#!/usr/bin/env bash
# Instructions the broker executes per cache-hit UnwrapKey, counted by valgrind's callgrind: a
# figure that does not move with the machine's load, so two builds can be compared on a busy
# machine where timings (benches/limits.sh) cannot tell a 5% change from noise.
#
#   benches/instructions.sh BROKER_BINARY [BROKER_BINARY ...]
#   benches/instructions.sh target/release/tde-broker ../base/target/release/tde-broker
#
# For each binary: a broker runs under callgrind with instrumentation off; `tde-broker loadtest`
# (this tree's release binary, the same client for every broker) creates a vault and an RSA-2048
# key and starts unwrapping one DEK in an open loop; once unwraps flow, instrumentation is switched on
# for WINDOW seconds, then off. The broker's own counters (`stats`) say how many UnwrapKey calls
# fell inside the window; the collected instructions divided by that count is the figure (it also
# holds the broker's idle work in the window: housekeeping, timers). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "instructions.sh needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v callgrind_control >/dev/null || { echo "instructions.sh needs callgrind_control (valgrind)" >&2; exit 1; }
RATE="${RATE:-400}"
WINDOW="${WINDOW:-15}"
cargo build --release --quiet
CLIENT="$PWD/target/release/tde-broker"
# shellcheck source=benches/common.sh
source benches/common.sh

# unwraps DATA ADDR: UnwrapKey calls answered OK so far, by the broker's counters.
unwraps() {
  "$CLIENT" --server "$2" --data-dir "$1" --output json stats | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(sum(r.get("count", 0) for r in d.get("requests", [])
          if r.get("method") == "UnwrapKey" and r.get("outcome") == "OK"))'
}

echo "| broker binary | UnwrapKey calls in the window | instructions | instructions per call |"
echo "|---|---|---|---|"
for bin in "$@"; do
  bin="$(realpath "$bin")"
  data="$WORK/data.$RANDOM"
  mkdir -p "$data"
  p="$(port)"
  addr="http://127.0.0.1:$p"
  out="$WORK/callgrind.out.$p"
  RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$bin" serve --data-dir "$data" --listen "127.0.0.1:$p" --http-listen off >"$WORK/broker.$p.log" 2>&1 &
  broker=$!
  PIDS+=("$broker")
  for _ in $(seq 1 600); do
    [ -s "$data/admin.token" ] && "$CLIENT" --server "$addr" --data-dir "$data" clock show >/dev/null 2>&1 && break
    sleep 0.2
  done
  "$CLIENT" --server "$addr" --data-dir "$data" loadtest --op unwrap --concurrency 4 --rate "$RATE" \
    --warmup 600s --duration 1s >"$WORK/loadtest.$p.log" 2>&1 &
  PIDS+=("$!")
  # Wait for the unwraps to flow (the key's generation runs first, slowly under valgrind).
  for _ in $(seq 1 600); do
    [ "$(unwraps "$data" "$addr")" -gt 200 ] && break
    sleep 1
  done
  before="$(unwraps "$data" "$addr")"
  callgrind_control -i on "$broker" >/dev/null
  sleep "$WINDOW"
  callgrind_control -i off "$broker" >/dev/null
  after="$(unwraps "$data" "$addr")"
  callgrind_control -d "$broker" >/dev/null
  sleep 1
  ir="$(cat "$out"* | awk '/^totals:/ {s += $2} END {print s + 0}')"
  calls=$((after - before))
  echo "| $bin | $calls | $ir | $((ir / (calls > 0 ? calls : 1))) |"
  kill "$broker" 2>/dev/null || true
  wait "$broker" 2>/dev/null || true
  rm -f "$out"*
done
