#!/usr/bin/env bash
# Soak (issue 17): a broker under 80 % of its measured peak for DURATION seconds (default 600),
# open loop, while a churn loop changes what the hot path depends on; prints latency per minute,
# the broker's RSS and open file descriptors, errors by status, and a verdict.
#
#   benches/soak.sh                 # ~12 minutes after the build
#   DURATION=120 benches/soak.sh    # shorter
#
# 1. Peak: `tde-broker loadtest` closed loop (UnwrapKey, PEAK_CONCURRENCY in flight) for PEAK.
# 2. Load: the same workload open loop at LOAD × peak (`--rate`), `--report-every REPORT_EVERY`
#    (a line per interval: counts, errors by code, p50/p90/p99/p99.9/max).
# 3. Churn, through the CLI, until the load ends: the access policy of a second user on a vault
#    of its own set and removed, a key of that vault rotated (a new version) every third round,
#    and the manual clock moved 30 s forward (the admin token lives 365 days on the broker's
#    clock: the clock only moves forward, by a few hours in all). Every change moves the epoch,
#    so the hot path's cached authorization decisions are dropped each time.
# 4. Every SAMPLE_EVERY s: the broker's VmRSS (/proc/PID/status) and open fds (/proc/PID/fd).
#
# Verdict (exit 1 when violated): no failed request and no failed churn command (counted by
# status); the broker still running; RSS and fds flat within ±TOLERANCE % — the median of the
# samples of the first interval after the warm-up interval against the median of the last.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-600}"
PEAK="${PEAK:-15}"
LOAD="${LOAD:-0.8}"
REPORT_EVERY="${REPORT_EVERY:-60}"
SAMPLE_EVERY="${SAMPLE_EVERY:-10}"
TOLERANCE="${TOLERANCE:-10}"
PEAK_CONCURRENCY="${PEAK_CONCURRENCY:-16}"
OPEN_CONCURRENCY="${OPEN_CONCURRENCY:-64}"
WORKLOAD=(--op unwrap --keys 4 --distinct-ciphertexts 256 --connections 2)
command -v python3 >/dev/null || { echo "soak.sh needs python3 (apt-get install python3)" >&2; exit 1; }
if [ "$DURATION" -lt $((3 * REPORT_EVERY)) ]; then
  echo "soak.sh: DURATION=$DURATION is shorter than three intervals of $REPORT_EVERY s (warm-up, first, last)" >&2
  exit 2
fi

[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet
BIN="${BIN:-$PWD/target/release/tde-broker}"
# shellcheck source=benches/common.sh
source benches/common.sh

DATA="$WORK/data"
P="$(port)"
RUST_LOG=warn "$BIN" serve --data-dir "$DATA" --listen "127.0.0.1:$P" --http-listen off --clock manual \
  > "$WORK/broker.log" 2>&1 &
BROKER=$!
PIDS+=("$BROKER")
for _ in $(seq 200); do [ -s "$DATA/admin.token" ] && break; sleep 0.05; done
sleep 0.3
CLI=("$BIN" --server "http://127.0.0.1:$P" --data-dir "$DATA")
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

echo "soak: broker PID $BROKER on 127.0.0.1:$P, $(nproc) cores, $("$BIN" --version)"
"${CLI[@]}" --output json loadtest "${WORKLOAD[@]}" --concurrency "$PEAK_CONCURRENCY" \
  --duration "${PEAK}s" --warmup 2s > "$WORK/peak.json" 2> "$WORK/peak.err" \
  || { echo "soak: the peak run failed:" >&2; tail -5 "$WORK/peak.err" >&2; exit 1; }
PEAK_RATE="$(json 'round(d["throughput_ok_per_s"])' < "$WORK/peak.json")"
RATE="$(python3 -c "print(round($LOAD * $PEAK_RATE))")"
echo "soak: peak $PEAK_RATE UnwrapKey/s closed loop ($PEAK_CONCURRENCY in flight); load $RATE/s open loop for $DURATION s"

# The churn's second identity and vault.
USER_OID="$("${CLI[@]}" --output json user create soak-churn | json 'd["principal_id"]')"
"${CLI[@]}" vault create soak-churn > /dev/null
"${CLI[@]}" key create soak-churn churn > /dev/null

T0="$(date +%s)"
sampler() {
  while kill -0 "$BROKER" 2>/dev/null && [ ! -e "$WORK/stop" ]; do
    local rss fds
    rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$BROKER/status" 2>/dev/null || echo 0)"
    fds="$(find "/proc/$BROKER/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    echo "$(date +%s) $rss $fds"
    sleep "$SAMPLE_EVERY"
  done
}
sampler > "$WORK/samples" &
PIDS+=("$!")

# run WHAT ARGS...: one churn command; "ok WHAT" or "FAIL WHAT CODE" into $WORK/churn.
run() {
  local what="$1"; shift
  if "${CLI[@]}" "$@" > /dev/null 2> "$WORK/churn.err"; then
    echo "ok $what"
  else
    local code
    code="$(grep -oE '\b[A-Z]+(_[A-Z]+)*\b' "$WORK/churn.err" | grep -vE '^(ERROR|TLS|HTTP)$' | head -1 || true)"
    echo "FAIL $what ${code:-EXIT} $(head -c 300 "$WORK/churn.err" | tr '\n' ' ')"
  fi
}
churn() {
  local round=0
  while [ ! -e "$WORK/stop" ]; do
    run policy-set policy set --object-id "$USER_OID" --permissions get,wrapKey,unwrapKey soak-churn
    if [ $((round % 3)) -eq 0 ]; then
      run key-rotate key rotate https://soak-churn.vault.azure.net/keys/churn
    fi
    run policy-delete policy delete --object-id "$USER_OID" soak-churn
    run clock-advance clock advance 30s
    round=$((round + 1))
    sleep 1
  done
}
churn > "$WORK/churn" &
CHURN=$!
PIDS+=("$CHURN")

# The load; each of its stderr lines is stamped with the time it came.
set +e
"${CLI[@]}" --output json loadtest "${WORKLOAD[@]}" --rate "$RATE" --concurrency "$OPEN_CONCURRENCY" \
  --duration "${DURATION}s" --warmup 5s --report-every "${REPORT_EVERY}s" > "$WORK/load.json" \
  2> >(while IFS= read -r line; do echo "$(date +%s) $line"; done > "$WORK/load.err")
LOAD_EXIT=$?
set -e
touch "$WORK/stop"
wait "$CHURN" 2>/dev/null || true
sleep 1
ALIVE=yes
kill -0 "$BROKER" 2>/dev/null || ALIVE=no

python3 - "$WORK" "$T0" "$REPORT_EVERY" "$TOLERANCE" "$LOAD_EXIT" "$ALIVE" <<'EOF'
import collections, json, re, statistics, sys
work, t0, every, tolerance, load_exit, alive = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
samples = [tuple(map(int, l.split())) for l in open(f"{work}/samples") if len(l.split()) == 3]
pattern = re.compile(r"^(\d+) loadtest broker interval (\d+)s-(\d+)s ok (\d+) \((\d+)/s\) errors (\d+)(?: (\S+))? "
                     r"p50 (\d+) p90 (\d+) p99 (\d+) p99\.9 (\d+) max (\d+) us$")
intervals = []
for line in open(f"{work}/load.err"):
    m = pattern.match(line.strip())
    if m:
        stamp, a, b, ok, rate, errs, codes, p50, p90, p99, p999, mx = m.groups()
        # The samples taken while this interval ran.
        length = int(b) - int(a)
        inside = [s for s in samples if int(stamp) - length < s[0] <= int(stamp)]
        rss = statistics.median(s[1] for s in inside) if inside else 0
        fds = statistics.median(s[2] for s in inside) if inside else 0
        intervals.append(dict(span=f"{a}-{b}", ok=int(ok), rate=int(rate), errors=int(errs), codes=codes or "",
                              p50=int(p50), p90=int(p90), p99=int(p99), p999=int(p999), max=int(mx),
                              rss=rss, fds=fds, n=len(inside)))
print()
print("| interval (s) | ok | ok/s | errors | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | RSS MiB (median) | fds (median) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for i in intervals:
    errors = f"{i['errors']} {i['codes']}".strip()
    print(f"| {i['span']} | {i['ok']} | {i['rate']} | {errors} | {i['p50']} | {i['p90']} | {i['p99']} | {i['p999']} | {i['max']} | {i['rss'] / 1024:.1f} | {i['fds']:.0f} |")

try:
    report = json.load(open(f"{work}/load.json"))
except (OSError, ValueError):
    report = {}
by_code = report.get("errors", {}).get("by_code", {})
churn = [l.split(None, 3) for l in open(f"{work}/churn")]
churn_ok = collections.Counter(c[1] for c in churn if c[0] == "ok")
churn_failed = collections.Counter(f"{c[1]} {c[2]}" for c in churn if c[0] == "FAIL")
print()
print(f"load: {report.get('requests', 0)} requests measured, {report.get('ok', 0)} ok, "
      f"{report.get('throughput_ok_per_s', 0):.0f}/s; errors by status: {dict(by_code) or 'none'}; "
      f"latency µs overall {report.get('latency_us', {})}; backlog {report.get('backlog')}")
print(f"churn: {dict(churn_ok)} ok; failed: {dict(churn_failed) or 'none'}")
for c in churn:
    if c[0] == "FAIL":
        print("  churn failure:", " ".join(c[1:])[:300])

problems = []
if load_exit != 0 or by_code:
    problems.append(f"loadtest exited {load_exit} with errors {dict(by_code)}")
if churn_failed:
    problems.append(f"churn commands failed: {dict(churn_failed)}")
if alive != "yes":
    problems.append("the broker is no longer running")
if len(intervals) < 3:
    problems.append(f"only {len(intervals)} intervals reported")
else:
    first, last = intervals[1], intervals[-1]
    for what, unit, scale in (("rss", "MiB", 1024), ("fds", "", 1)):
        a, b = first[what], last[what]
        change = (b - a) / a * 100 if a else float("inf")
        flat = abs(change) <= tolerance
        print(f"{what}: {a / scale:.1f}{unit} in {first['span']} s → {b / scale:.1f}{unit} in {last['span']} s "
              f"({change:+.1f} %, limit ±{tolerance:g} %): {'flat' if flat else 'NOT FLAT'}")
        if not flat:
            problems.append(f"{what} moved {change:+.1f} %")
print()
if problems:
    print("VERDICT: FAIL —", "; ".join(problems))
    sys.exit(1)
print("VERDICT: PASS — no failed request or churn command, the broker up, RSS and fds flat")
EOF
