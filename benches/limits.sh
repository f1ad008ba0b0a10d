#!/usr/bin/env bash
# Measures the hot-path figures of docs/PERFORMANCE.md in one run on this machine and prints them
# as a Markdown table with their ratios to the limits (issue 6). Every ratio compares two figures
# measured here, one right after the other; nothing is compared with a number from elsewhere.
#
#   benches/limits.sh            # ~13 minutes on 2 cores after the build; needs openssl, python3, h2load
#   ROUNDS=5 benches/limits.sh   # more rounds per comparison (the median is reported)
#   benches/limits.sh rest       # the REST figures only (~4 minutes): see below
#
# The single-client comparison runs three times as many rounds, each shorter (SINGLE_ROUNDS,
# SINGLE_DURATION): with one request in flight the round trip depends on where the scheduler
# puts the client's and the server's threads, which is decided per run, so more pairs of runs
# give a steadier median in the same time.
#
# It builds the release binary, starts a broker in a temporary data directory (and a second one
# with the caches off), runs `tde-broker loadtest --compare-baseline` for each figure, then
# `cargo bench --bench footprint`.
#
# Two figures are measured a second way, with h2load (nghttp2's HTTP/2 load generator, written in C)
# as the client, as docs/PERFORMANCE.md's reference figures are: `h2load -c4 -m32` posting one
# framed UnwrapKeyRequest over and over, against the broker and against the same bare baseline that
# `loadtest --baseline` uses. h2load spends a fraction of the CPU per request that a tonic client
# does, so on a machine whose cores the generator shares, more of them go to the server measured.
# h2load only sees HTTP statuses (a gRPC error is an HTTP 200), so each h2load run against the
# broker is checked against the broker's own request counters: every request h2load counted must be
# an UnwrapKey that answered OK, and the plaintext is checked once through the CLI before.
#
# The REST figures (issue 20): cache-hit UnwrapKey over Key Vault's REST API (`loadtest --protocol
# rest`: HTTPS on the broker's --rest-listen, a hyper client on tokio-rustls), over HTTP/1.1 (64
# keep-alive connections, one per request in flight, as the Azure SDKs' pools hold them) and over
# h2 (4 connections, 64 streams in flight). Each round is one invocation that measures the broker
# over REST, then the same broker over gRPC with the same load (`--with-grpc`), then the bare
# hyper+rustls baseline that answers the same JSON (`--compare-baseline`), so both ratios compare
# figures taken one right after the other.
#
# The uncached figures are paired with `openssl speed -multi <cores> rsa2048` round by round
# (openssl, then both uncached runs), because openssl's own figure moves by 10-20% between
# runs on a shared machine; each round's ratio divides by the openssl figure measured beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-8s}"
SINGLE_ROUNDS="${SINGLE_ROUNDS:-$((3 * ROUNDS))}"
SINGLE_DURATION="${SINGLE_DURATION:-3s}"
CORES="$(nproc)"
MODE="${1:-all}"
case "$MODE" in all|rest) ;; *) echo "usage: benches/limits.sh [rest]" >&2; exit 2 ;; esac
command -v python3 >/dev/null || { echo "limits.sh needs python3 (apt-get install python3)" >&2; exit 1; }
if [ "$MODE" = all ]; then
  command -v openssl >/dev/null || { echo "limits.sh needs openssl (apt-get install openssl)" >&2; exit 1; }
  command -v h2load >/dev/null || { echo "limits.sh needs h2load (apt-get install nghttp2-client)" >&2; exit 1; }
fi

cargo build --release --quiet
BIN="$PWD/target/release/tde-broker"
# shellcheck source=benches/common.sh
source benches/common.sh

# start NAME [config lines...]: a broker on a free port, its REST listener on another; sets
# ADDR_<NAME>, REST_<NAME> and DATA_<NAME>.
start() {
  local name="$1"; shift
  local data="$WORK/$name" p r; p="$(port)"; r="$(port)"
  mkdir -p "$data"
  printf '%s\n' "$@" > "$WORK/$name.toml"
  RUST_LOG=warn "$BIN" serve --data-dir "$data" --listen "127.0.0.1:$p" --http-listen off \
    --rest-listen "127.0.0.1:$r" --config "$WORK/$name.toml" > "$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 200); do [ -s "$data/admin.token" ] && break; sleep 0.05; done
  sleep 0.3
  printf -v "ADDR_$name" "%s" "http://127.0.0.1:$p"
  printf -v "REST_$name" "%s" "https://127.0.0.1:$r"
  printf -v "DATA_$name" '%s' "$data"
}

# loadtest NAME I SERVER DATA ARGS...: one `loadtest --compare-baseline` run of DURATION (or
# $duration) as JSON into $WORK/NAME.I.json.
loadtest() {
  local name="$1" i="$2" server="$3" data="$4"; shift 4
  "$BIN" --server "$server" --data-dir "$data" --output json loadtest --compare-baseline \
    --duration "${duration:-$DURATION}" "$@" > "$WORK/$name.$i.json" 2> "$WORK/$name.$i.err" \
    || { echo "loadtest $name failed:" >&2; tail -5 "$WORK/$name.$i.err" >&2; exit 1; }
}

# compare NAME SERVER DATA ARGS...: ROUNDS (or $rounds) loadtest runs, $WORK/NAME.1.json onwards.
compare() {
  local name="$1"; shift
  for i in $(seq "${rounds:-$ROUNDS}"); do loadtest "$name" "$i" "$@"; done
}

# h2load_target NAME SERVER DATA: a vault, a key and one wrapped DEK on that broker, the
# plaintext checked once through the CLI, and the gRPC-framed UnwrapKeyRequest that h2load posts
# in $WORK/NAME.body.
h2load_target() {
  local name="$1" server="$2" data="$3" dek
  local cli=("$BIN" --server "$server" --data-dir "$data")
  dek="$(openssl rand -hex 32)"
  "${cli[@]}" vault create h2load > /dev/null
  "${cli[@]}" key create h2load kek > /dev/null
  "${cli[@]}" --output json key wrap --alg RSA-OAEP-256 --value-hex "$dek" \
    https://h2load.vault.azure.net/keys/kek > "$WORK/$name.wrap.json"
  python3 - "$WORK/$name.wrap.json" "$WORK/$name.body" "$WORK/$name.kid" "$WORK/$name.value" <<'EOF'
import base64, json, struct, sys
wrap = json.load(open(sys.argv[1]))
def varint(n):
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)
def field(number, data):  # a length-delimited protobuf field
    return varint(number << 3 | 2) + varint(len(data)) + data
# UnwrapKeyRequest { key_id = 1; algorithm = 2; value = 3 }, behind gRPC's 5-byte frame header.
message = field(1, wrap["kid"].encode()) + field(2, b"RSA-OAEP-256") + field(3, base64.b64decode(wrap["value"]))
open(sys.argv[2], "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
open(sys.argv[3], "w").write(wrap["kid"])
open(sys.argv[4], "w").write(wrap["value"])
EOF
  "${cli[@]}" --output json key unwrap --alg RSA-OAEP-256 --value-b64 "$(cat "$WORK/$name.value")" \
    "$(cat "$WORK/$name.kid")" | python3 -c '
import base64, json, sys
got = base64.b64decode(json.load(sys.stdin)["value"]).hex()
sys.exit(0 if got == sys.argv[1] else "h2load target: UnwrapKey returned another plaintext")' "$dek"
}

# unwrap_counts SERVER DATA: the broker'"'"'s UnwrapKey counters as JSON {outcome: count}.
unwrap_counts() {
  "$BIN" --server "$1" --data-dir "$2" --output json stats | python3 -c '
import json, sys
print(json.dumps({r["outcome"]: r["count"] for r in json.load(sys.stdin)["requests"] if r["method"] == "UnwrapKey"}))'
}

# h2load_run OUT URL BODY DATA [broker]: `h2load -c4 -m32` for DURATION after a 1 s warm-up,
# with the bearer token of DATA's broker, its output in OUT. The baseline gets the same token as
# the broker (decoding its 948 bytes is the transport's cost, paid by both). With `broker`, URL
# is that broker, and its counters are checked afterwards.
h2load_run() {
  local out="$1" url="$2" body="$3" data="$4" check="${5:-}" before=""
  [ -n "$check" ] && before="$(unwrap_counts "$url" "$data")"
  h2load -D "$DURATION" --warm-up-time 1 -c 4 -m 32 -H 'content-type: application/grpc' \
    -H 'te: trailers' -H "authorization: Bearer $(cat "$data/admin.token")" -d "$body" \
    "$url/tdebroker.v1.KeyVault/UnwrapKey" > "$out" 2>&1 \
    || { echo "h2load failed:" >&2; tail -5 "$out" >&2; exit 1; }
  [ -z "$check" ] && return 0
  # h2load stops with up to 4 x 32 requests in flight; the broker records those it had begun
  # as failed (tonic reports a connection closed mid-request as Unknown).
  python3 - "$out" "$before" "$(unwrap_counts "$url" "$data")" <<'EOF' || exit 1
import json, re, sys
text, before, after = open(sys.argv[1]).read(), json.loads(sys.argv[2]), json.loads(sys.argv[3])
m = re.search(r"^requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", text, re.M)
if not m:
    sys.exit(f"h2load: no request summary in {sys.argv[1]}")
delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
ok, other = delta.get("OK", 0), sum(v for k, v in delta.items() if k != "OK")
if ok < int(m.group(2)) or other > 4 * 32:
    sys.exit(f"h2load: it counted {m.group(2)} answers, the broker {ok} UnwrapKey OK and {other} others: {delta}")
EOF
}

# rest_figures: the REST rounds (HTTP/1.1, then h2) against the hot broker.
rest_figures() {
  echo "== cache-hit unwrapkey over REST, HTTP/1.1, 64 in flight: broker, the same over gRPC, bare hyper+rustls baseline" >&2
  compare rest1 "$ADDR_hot" "$DATA_hot" --protocol rest --http 1 --rest-server "$REST_hot" --with-grpc \
    --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 4
  echo "== cache-hit unwrapkey over REST, h2 over 4 connections, 64 in flight: the same three" >&2
  compare rest2 "$ADDR_hot" "$DATA_hot" --protocol rest --http 2 --rest-server "$REST_hot" --with-grpc \
    --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 4
}

# rest_table: the REST rows, from $WORK/rest{1,2}.*.json.
rest_table() {
  python3 - "$WORK" "$ROUNDS" "$CORES" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'EOF'
import json, statistics, sys
w, n, cores, load = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def runs(name):
    return [json.load(open(f"{w}/{name}.{i}.json")) for i in range(1, n + 1)]
def get(r, path):
    for p in path.split("."):
        r = r[p]
    return r
def fmt(xs, f="{:.3f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f.format(statistics.median(xs)) + (" (" + ", ".join(f.format(x) for x in xs) + ")" if len(xs) > 1 else "")
print(f"\nREST rounds: {n} (median, then every round in brackets). Cores: {cores}; load average after the runs: {load}.\n")
print("| figure | REST broker | other | ratio | limit |")
print("|---|---|---|---|---|")
for name, http in (("rest1", "HTTP/1.1, 64 keep-alive connections"), ("rest2", "h2, 4 connections")):
    rs = runs(name)
    b = lambda path: [get(r, "broker." + path) for r in rs]
    o = lambda who, path: [get(r, who + "." + path) for r in rs]
    ratio = lambda who, key: [r[who][key] for r in rs]
    what = f"cache-hit unwrapkey over REST, {http}, 64 in flight"
    print(f"| {what}, ok/s vs bare hyper+rustls | {fmt(b('throughput_ok_per_s'),'{:.0f}')} | {fmt(o('baseline','throughput_ok_per_s'),'{:.0f}')} | {fmt(ratio('ratio','throughput'))} | ≥ 0.85 |")
    print(f"| … p50 / p99 µs, broker vs baseline | {fmt(b('latency_us.p50'),'{:.0f}')} / {fmt(b('latency_us.p99'),'{:.0f}')} | {fmt(o('baseline','latency_us.p50'),'{:.0f}')} / {fmt(o('baseline','latency_us.p99'),'{:.0f}')} | p50 {fmt(ratio('ratio','p50'))}, p99 {fmt(ratio('ratio','p99'))} | — |")
    print(f"| … vs the same broker over gRPC (same load), ok/s | {fmt(b('throughput_ok_per_s'),'{:.0f}')} | gRPC {fmt(o('grpc','throughput_ok_per_s'),'{:.0f}')} | {fmt(ratio('rest_vs_grpc','throughput'))} | — |")
EOF
}

start hot
if [ "$MODE" = rest ]; then
  rest_figures
  rest_table
  exit 0
fi
start cold 'cache_enabled = false'

echo "== cache-hit UnwrapKey, 64 in flight over 4 connections" >&2
compare hit "$ADDR_hot" "$DATA_hot" --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 4
echo "== single client, one request in flight" >&2
rounds="$SINGLE_ROUNDS" duration="$SINGLE_DURATION" \
  compare single "$ADDR_hot" "$DATA_hot" --op unwrap --concurrency 1 --connections 1 --keys 1 --distinct-ciphertexts 4
echo "== uncached RSA-2048 UnwrapKey (caches off): openssl speed -multi $CORES rsa2048, then loadtest 64 in flight, then h2load -c4 -m32, per round" >&2
h2load_target cold "$ADDR_cold" "$DATA_cold"
for i in $(seq "$ROUNDS"); do
  openssl speed -seconds 5 -multi "$CORES" rsa2048 > "$WORK/openssl.$i.txt" 2>&1
  loadtest cold "$i" "$ADDR_cold" "$DATA_cold" --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 64
  h2load_run "$WORK/h2cold.$i.txt" "$ADDR_cold" "$WORK/cold.body" "$DATA_cold" broker
done

echo "== cache-hit UnwrapKey with h2load -c4 -m32: the broker, then the bare baseline, per round" >&2
mkfifo "$WORK/baseline.in"
"$BIN" loadtest --serve-baseline < "$WORK/baseline.in" > "$WORK/baseline.addr" 2> "$WORK/baseline.err" &
PIDS+=("$!")
exec 3> "$WORK/baseline.in"
for _ in $(seq 100); do [ -s "$WORK/baseline.addr" ] && break; sleep 0.05; done
BASELINE="http://$(sed -n 's/^listening //p' "$WORK/baseline.addr")"
[ "$BASELINE" != "http://" ] || { echo "the baseline did not start:" >&2; cat "$WORK/baseline.err" >&2; exit 1; }
h2load_target hot "$ADDR_hot" "$DATA_hot"
for i in $(seq "$ROUNDS"); do
  h2load_run "$WORK/h2hit.$i.txt" "$ADDR_hot" "$WORK/hot.body" "$DATA_hot" broker
  h2load_run "$WORK/h2base.$i.txt" "$BASELINE" "$WORK/hot.body" "$DATA_hot"
done
PEAK="$(python3 - "$WORK" "$ROUNDS" <<'EOF'
import json, statistics, sys
w, n = sys.argv[1], int(sys.argv[2])
print(int(statistics.median(json.load(open(f"{w}/hit.{i}.json"))["broker"]["throughput_ok_per_s"] for i in range(1, n + 1))))
EOF
)"
HALF=$((PEAK / 2))
echo "== open loop at half the cache-hit peak ($HALF/s of $PEAK/s)" >&2
compare half "$ADDR_hot" "$DATA_hot" --op unwrap --concurrency 64 --connections 4 --keys 4 --distinct-ciphertexts 4 --rate "$HALF"

rest_figures

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

def openssl(i):
    text = open(f"{w}/openssl.{i}.txt").read()
    m = re.search(r"^rsa\s*2048 bits?\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)", text, re.M)
    if not m:
        m = re.search(r"^rsa2048\s.*?\s([\d.]+)\s+([\d.]+)\s*$", text, re.M)
    return float(m.group(1)) if m else float("nan")
def h2load(name):
    out = []
    for i in range(1, n + 1):
        m = re.search(r"^finished in [\d.]+s, ([\d.]+) req/s", open(f"{w}/{name}.{i}.txt").read(), re.M)
        out.append(float(m.group(1)) if m else float("nan"))
    return out
ossl = [openssl(i) for i in range(1, n + 1)]
cold = side("cold", "broker", "throughput_ok_per_s")
h2cold, h2hit, h2base = h2load("h2cold"), h2load("h2hit"), h2load("h2base")
per_round = lambda xs, ys: [x / y for x, y in zip(xs, ys)]

print(f"Rounds per comparison: {n}; single client: {single_n} shorter ones (median, then every round in brackets). Cores: {cores}.\n")
print("| figure | broker | baseline | ratio | limit |")
print("|---|---|---|---|---|")
print(f"| cache-hit UnwrapKey, 64 in flight, ok/s | {fmt(side('hit','broker','throughput_ok_per_s'),'{:.0f}')} | {fmt(side('hit','baseline','throughput_ok_per_s'),'{:.0f}')} | {fmt(ratio('hit','throughput'))} | ≥ 0.9 |")
print(f"| single client p50 round trip, µs | {fmt(side('single','broker','latency_us.p50'),'{:.0f}')} | {fmt(side('single','baseline','latency_us.p50'),'{:.0f}')} | {fmt(ratio('single','p50'))} | ≤ 1.1 |")
print(f"| single client throughput, ok/s | {fmt(side('single','broker','throughput_ok_per_s'),'{:.0f}')} | {fmt(side('single','baseline','throughput_ok_per_s'),'{:.0f}')} | {fmt(ratio('single','throughput'))} | — |")
print(f"| cache-hit UnwrapKey, h2load -c4 -m32, req/s | {fmt(h2hit,'{:.0f}')} | {fmt(h2base,'{:.0f}')} | {fmt(per_round(h2hit, h2base))} | ≥ 0.9 |")
print(f"| uncached RSA-2048 UnwrapKey, ok/s (caches off), loadtest 64 in flight | {fmt(cold,'{:.0f}')} | openssl -multi {cores}: {fmt(ossl,'{:.0f}')} private ops/s | {fmt(per_round(cold, ossl))} | ≥ 0.85 |")
print(f"| uncached RSA-2048 UnwrapKey, req/s (caches off), h2load -c4 -m32 | {fmt(h2cold,'{:.0f}')} | openssl, as above | {fmt(per_round(h2cold, ossl))} | ≥ 0.85 |")
print(f"| p99 at half the cache-hit peak (open loop), µs | {fmt(side('half','broker','latency_us.p99'),'{:.0f}')} | {fmt(side('half','baseline','latency_us.p99'),'{:.0f}')} | {fmt(ratio('half','p99'))} | ≤ 1000 µs |")
print(f"| … of which the generator's own send lag, p99 µs | {fmt(side('half','broker','send_lag_us.p99'),'{:.0f}')} | {fmt(side('half','baseline','send_lag_us.p99'),'{:.0f}')} | — | — |")
print()
print(open(f"{w}/footprint.md").read().strip())
EOF
rest_table
