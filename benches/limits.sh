#!/usr/bin/env bash
# Measures the hot-path figures of docs/PERFORMANCE.md in one run on this machine and prints them
# as a Markdown table with their ratios to the limits (issue 6). Every ratio compares two figures
# measured here, one right after the other; nothing is compared with a number from elsewhere.
#
#   benches/limits.sh            # ~6 minutes on 2 cores; needs openssl and python3
#   ROUNDS=5 benches/limits.sh   # more rounds per comparison (the median is reported)
#
# The single-client comparison runs three times as many rounds, each shorter (SINGLE_ROUNDS,
# SINGLE_DURATION): with one request in flight the round trip depends on where the scheduler
# puts the client's and the server's threads, which is decided per run, so more pairs of runs
# give a steadier median in the same time.
#
# It builds the release binary, starts a broker in a temporary data directory (and a second one
# with the caches off), runs `tde-broker loadtest --compare-baseline` for each figure, then
# `openssl speed -multi <cores> rsa2048`, then `cargo bench --bench footprint`.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-8s}"
SINGLE_ROUNDS="${SINGLE_ROUNDS:-$((3 * ROUNDS))}"
SINGLE_DURATION="${SINGLE_DURATION:-3s}"
CORES="$(nproc)"
command -v openssl >/dev/null || { echo "limits.sh needs openssl (apt-get install openssl)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "limits.sh needs python3 (apt-get install python3)" >&2; exit 1; }

cargo build --release --quiet
BIN="$PWD/target/release/tde-broker"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME [config lines...]: a broker on a free port; sets ADDR_<NAME> and DATA_<NAME>.
start() {
  local name="$1"; shift
  local data="$WORK/$name" p; p="$(port)"
  mkdir -p "$data"
  printf '%s\n' "$@" > "$WORK/$name.toml"
  RUST_LOG=warn "$BIN" serve --data-dir "$data" --listen "127.0.0.1:$p" --http-listen off \
    --config "$WORK/$name.toml" > "$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 200); do [ -s "$data/admin.token" ] && break; sleep 0.05; done
  sleep 0.3
  printf -v "ADDR_$name" "%s" "http://127.0.0.1:$p"
  printf -v "DATA_$name" '%s' "$data"
}

# compare NAME ARGS...: ROUNDS (or $rounds) `loadtest --compare-baseline` runs of DURATION (or
# $duration) as JSON into $WORK/NAME.N.json.
compare() {
  local name="$1" server="$2" data="$3"; shift 3
  for i in $(seq "${rounds:-$ROUNDS}"); do
    "$BIN" --server "$server" --data-dir "$data" --output json loadtest --compare-baseline \
      --duration "${duration:-$DURATION}" "$@" > "$WORK/$name.$i.json" 2> "$WORK/$name.$i.err" \
      || { echo "loadtest $name failed:" >&2; tail -5 "$WORK/$name.$i.err" >&2; exit 1; }
  done
}

start hot
start cold 'cache_enabled = false'

echo "== cache-hit UnwrapKey, 64 in flight over 4 connections" >&2
compare hit "$ADDR_hot" "$DATA_hot" --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 4
echo "== single client, one request in flight" >&2
rounds="$SINGLE_ROUNDS" duration="$SINGLE_DURATION" \
  compare single "$ADDR_hot" "$DATA_hot" --op unwrap --concurrency 1 --connections 1 --keys 1 --distinct-ciphertexts 4
echo "== uncached RSA-2048 UnwrapKey (caches off), 64 in flight" >&2
compare cold "$ADDR_cold" "$DATA_cold" --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 64
PEAK="$(python3 - "$WORK" "$ROUNDS" <<'EOF'
import json, statistics, sys
w, n = sys.argv[1], int(sys.argv[2])
print(int(statistics.median(json.load(open(f"{w}/hit.{i}.json"))["broker"]["throughput_ok_per_s"] for i in range(1, n + 1))))
EOF
)"
HALF=$((PEAK / 2))
echo "== open loop at half the cache-hit peak ($HALF/s of $PEAK/s)" >&2
compare half "$ADDR_hot" "$DATA_hot" --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 4 --rate "$HALF"

echo "== openssl speed -multi $CORES rsa2048" >&2
openssl speed -seconds 5 -multi "$CORES" rsa2048 > "$WORK/openssl.txt" 2>&1

echo "== footprint (cargo bench --bench footprint)" >&2
cargo bench --quiet --bench footprint > "$WORK/footprint.md" 2> "$WORK/footprint.err" \
  || { tail -20 "$WORK/footprint.err" >&2; exit 1; }

python3 - "$WORK" "$ROUNDS" "$CORES" "$SINGLE_ROUNDS" <<'EOF'
import json, re, statistics, sys
w, n, cores, single_n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def runs(name):
    count = single_n if name == "single" else n
    return [json.load(open(f"{w}/{name}.{i}.json")) for i in range(1, count + 1)]
def med(xs):
    return statistics.median(xs)
def side(name, who, path):
    out = []
    for r in runs(name):
        v = r[who]
        for p in path.split("."):
            v = v[p]
        out.append(v)
    return out
def ratio(name, key):
    return [r["ratio"][key] for r in runs(name)]
def fmt(xs, f="{:.3f}"):
    return f.format(med(xs)) + (" (" + ", ".join(f.format(x) for x in xs) + ")" if len(xs) > 1 else "")

text = open(f"{w}/openssl.txt").read()
m = re.search(r"^rsa\s*2048 bits?\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)", text, re.M)
if not m:
    m = re.search(r"^rsa2048\s.*?\s([\d.]+)\s+([\d.]+)\s*$", text, re.M)
openssl_sign = float(m.group(1)) if m else float("nan")
cold = side("cold", "broker", "throughput_ok_per_s")

print(f"Rounds per comparison: {n}; single client: {single_n} shorter ones (median, then every round in brackets). Cores: {cores}.\n")
print("| figure | broker | baseline | ratio | limit |")
print("|---|---|---|---|---|")
print(f"| cache-hit UnwrapKey, 64 in flight, ok/s | {fmt(side('hit','broker','throughput_ok_per_s'),'{:.0f}')} | {fmt(side('hit','baseline','throughput_ok_per_s'),'{:.0f}')} | {fmt(ratio('hit','throughput'))} | ≥ 0.9 |")
print(f"| single client p50 round trip, µs | {fmt(side('single','broker','latency_us.p50'),'{:.0f}')} | {fmt(side('single','baseline','latency_us.p50'),'{:.0f}')} | {fmt(ratio('single','p50'))} | ≤ 1.1 |")
print(f"| single client throughput, ok/s | {fmt(side('single','broker','throughput_ok_per_s'),'{:.0f}')} | {fmt(side('single','baseline','throughput_ok_per_s'),'{:.0f}')} | {fmt(ratio('single','throughput'))} | — |")
print(f"| uncached RSA-2048 UnwrapKey, ok/s (caches off) | {fmt(cold,'{:.0f}')} | openssl -multi {cores}: {openssl_sign:.0f} private ops/s | {med(cold)/openssl_sign:.3f} | ≥ 0.85 |")
print(f"| p99 at half the cache-hit peak (open loop), µs | {fmt(side('half','broker','latency_us.p99'),'{:.0f}')} | {fmt(side('half','baseline','latency_us.p99'),'{:.0f}')} | {fmt(ratio('half','p99'))} | ≤ 1000 µs |")
print(f"| … of which the generator's own send lag, p99 µs | {fmt(side('half','broker','send_lag_us.p99'),'{:.0f}')} | {fmt(side('half','baseline','send_lag_us.p99'),'{:.0f}')} | — | — |")
print()
print(open(f"{w}/footprint.md").read().strip())
EOF
