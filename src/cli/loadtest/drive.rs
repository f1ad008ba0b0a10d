//! Driving a load: workers with one request in flight each (closed loop) or taking send slots
//! from a pacer thread (open loop), every answer checked, latencies tallied in histograms, and
//! a progress line on stderr each second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::report::Report;
use super::rest::{Conn, RestFailure};
use super::workload::Workload;
use super::{ALGORITHM, Op, Plan, WRAPPED_BYTES};
use crate::cli::error::code_name;
use crate::grpc::proto;
use crate::grpc::proto::key_vault_client::KeyVaultClient;
use crate::grpc::proto::tde_engine_client::TdeEngineClient;
use crate::server::MAX_MESSAGE_BYTES;

/// A request without an answer by then counts as DEADLINE_EXCEEDED (the run cannot hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Highest latency the histogram holds, µs (larger values are clamped to it).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// The gRPC clients of one connection.
#[derive(Clone)]
pub(super) struct Clients {
    /// KeyVault: unwrap, wrap, get.
    kv: KeyVaultClient<Channel>,
    /// TdeEngine: engine-unwrap.
    engine: TdeEngineClient<Channel>,
}

/// One connection a worker sends on: gRPC, or REST over HTTPS.
// Built once per worker and never moved on the hot path: the size difference costs nothing,
// while boxing the gRPC clients would add a pointer chase to every gRPC request measured.
#[allow(clippy::large_enum_variant)]
pub(super) enum Caller {
    /// tonic clients on an HTTP/2 channel.
    Grpc(Clients),
    /// A hyper client on tokio-rustls.
    Rest(Conn),
}

/// The gRPC connections each of `concurrency` workers sends on: all of `channels`, round-robin.
pub(super) fn grpc_lanes(channels: &[Channel], concurrency: usize) -> Vec<Vec<Caller>> {
    let callers = || {
        channels
            .iter()
            .map(|ch| {
                Caller::Grpc(Clients {
                    kv: KeyVaultClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
                    engine: TdeEngineClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
                })
            })
            .collect()
    };
    (0..concurrency).map(|_| callers()).collect()
}

/// Why a request failed.
enum Failure {
    /// A gRPC status other than OK (or the client-side timeout).
    Status(Code, String),
    /// OK, but the answer is not what was asked for.
    Mismatch(String),
    /// A REST request answered another HTTP status, broke in transit, or answered wrongly.
    Rest(RestFailure),
}

impl Failure {
    /// The report's name of the failure: a gRPC code name, `MISMATCH`, `HTTP_403`, `TRANSPORT`.
    fn code(&self) -> &str {
        match self {
            Failure::Status(code, _) => code_name(*code),
            Failure::Mismatch(_) => "MISMATCH",
            Failure::Rest(f) => &f.code,
        }
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Status(s.code(), s.message().to_string())
    }
}

/// A mismatch saying `what` unless `ok`.
fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), Failure> {
    if ok { Ok(()) } else { Err(Failure::Mismatch(what())) }
}

/// Sends request `seq` on `caller` and checks its answer.
async fn call(caller: &mut Caller, w: &Workload, op: Op, seq: u64) -> Result<(), Failure> {
    match caller {
        Caller::Grpc(c) => call_grpc(c, w, op, seq).await,
        Caller::Rest(r) => r.call(w, op, seq).await.map_err(Failure::Rest),
    }
}

/// Sends gRPC request `seq` and checks its answer.
async fn call_grpc(c: &mut Clients, w: &Workload, op: Op, seq: u64) -> Result<(), Failure> {
    let (t, i) = w.pick(seq);
    match op {
        Op::Unwrap => {
            let request = proto::UnwrapKeyRequest {
                key_id: t.kid.clone(),
                algorithm: ALGORITHM.to_string(),
                value: t.wrapped(i).to_vec(),
                ..Default::default()
            };
            let r = c.kv.unwrap_key(t.request(request)).await?.into_inner();
            ensure(r.value == t.dek(i), || format!("UnwrapKey with {} returned another plaintext", t.kid))?;
            ensure(r.kid == t.kid, || format!("UnwrapKey with {} answered kid {}", t.kid, r.kid))
        }
        Op::Wrap => {
            let request = proto::WrapKeyRequest {
                key_id: t.kid.clone(),
                algorithm: ALGORITHM.to_string(),
                value: t.dek(i).to_vec(),
                ..Default::default()
            };
            let r = c.kv.wrap_key(t.request(request)).await?.into_inner();
            ensure(r.value.len() == WRAPPED_BYTES, || {
                format!("WrapKey with {} returned {} bytes, not {WRAPPED_BYTES}", t.kid, r.value.len())
            })?;
            ensure(r.kid == t.kid, || format!("WrapKey with {} answered kid {}", t.kid, r.kid))
        }
        Op::Get => {
            let r =
                c.kv.get_key(t.request(proto::GetKeyRequest { key_id: t.kid.clone() })).await?.into_inner();
            let key = r.key.unwrap_or_default();
            ensure(key.kid == t.kid, || format!("GetKey of {} answered kid {}", t.kid, key.kid))?;
            ensure(!key.n.is_empty(), || format!("GetKey of {} answered no modulus", t.kid))
        }
        Op::EngineUnwrap => {
            let request = proto::UnwrapDatabaseKeyRequest {
                database: t.database.clone(),
                kid: t.kid.clone(),
                wrapped_dek: t.wrapped(i).to_vec(),
            };
            let r = c.engine.unwrap_database_key(t.request(request)).await?.into_inner();
            ensure(r.dek == t.dek(i), || format!("UnwrapDatabaseKey with {} returned another DEK", t.kid))
        }
    }
}

/// State the workers, the pacer and the progress line share.
struct Shared {
    /// What the requests cycle over.
    workload: Arc<Workload>,
    /// What each request does.
    op: Op,
    /// When the run (its warm-up) started.
    start: Instant,
    /// Requests whose (intended) send time is earlier are warm-up.
    measure_from: Instant,
    /// Open loop: requests per second.
    rate: Option<f64>,
    /// Open loop: send slots the pacer released (closed when the run ends).
    slots: Semaphore,
    /// Slots released so far.
    released: AtomicU64,
    /// Next request's sequence number.
    seq: AtomicU64,
    /// Closed loop: stop sending.
    stop: AtomicBool,
    /// Completed requests, warm-up included, for the progress line.
    ok: AtomicU64,
    /// Failed requests, warm-up included, for the progress line.
    failed: AtomicU64,
    /// `--report-every`: what the measured requests of the current interval did.
    interval: Option<std::sync::Mutex<Interval>>,
}

/// The measured requests that completed in one interval of `--report-every`.
struct Interval {
    /// Latency of OK requests, µs.
    hist: Histogram<u64>,
    /// Failed requests by gRPC code name (or MISMATCH).
    errors: BTreeMap<String, u64>,
}

impl Interval {
    fn new() -> Self {
        Interval { hist: microseconds(), errors: BTreeMap::new() }
    }

    /// Counts one request: its latency when it succeeded, its code when not.
    fn record(&mut self, failed: Option<&str>, latency: Duration) {
        match failed {
            None => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
            }
            Some(code) => *self.errors.entry(code.to_string()).or_default() += 1,
        }
    }

    /// The report line of the interval from `from` to `to` (seconds into the measurement), and
    /// an empty interval in this one's place.
    fn take_line(&mut self, label: &str, from: f64, to: f64) -> String {
        let done = std::mem::replace(self, Interval::new());
        let ok = done.hist.len();
        let failed: u64 = done.errors.values().sum();
        let by_code: Vec<String> = done.errors.iter().map(|(c, n)| format!("{c}={n}")).collect();
        let p = |q: f64| if ok == 0 { 0 } else { done.hist.value_at_quantile(q) };
        let rate = if to > from { ok as f64 / (to - from) } else { 0.0 };
        format!(
            "loadtest {label} interval {from:.0}s-{to:.0}s ok {ok} ({rate:.0}/s) errors {failed}{}{} \
             p50 {} p90 {} p99 {} p99.9 {} max {} us",
            if by_code.is_empty() { "" } else { " " },
            by_code.join(","),
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            if ok == 0 { 0 } else { done.hist.max() },
        )
    }
}

/// What one worker measured.
pub(super) struct Tally {
    /// Latency of OK requests, µs.
    pub(super) hist: Histogram<u64>,
    /// Open loop: how late each measured request left after its intended send time, µs (the
    /// generator's own delay, included in `hist`; large values mean the generator, not the
    /// server, is behind).
    pub(super) lag: Histogram<u64>,
    /// Requests that succeeded.
    pub(super) ok: u64,
    /// Failed requests by gRPC code name (or MISMATCH).
    pub(super) errors: BTreeMap<String, u64>,
    /// The first message seen for each code.
    pub(super) first_message: BTreeMap<String, String>,
    /// Requests that were the first use of their ciphertext.
    pub(super) first_use: u64,
    /// When the last answer came.
    last_done: Option<Instant>,
}

/// An empty histogram of 1 µs .. `MAX_LATENCY_US`, 3 significant digits.
fn microseconds() -> Histogram<u64> {
    // 1 ≤ low, 2·low ≤ high and 3 significant digits: bounds hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("histogram bounds") // ok: constant, valid bounds
}

impl Tally {
    /// Nothing measured yet.
    fn new() -> Self {
        Tally {
            hist: microseconds(),
            lag: microseconds(),
            ok: 0,
            errors: BTreeMap::new(),
            first_message: BTreeMap::new(),
            first_use: 0,
            last_done: None,
        }
    }

    /// Counts one request: its latency when it succeeded, its code and message when not.
    fn record(&mut self, outcome: Result<(), Failure>, latency: Duration, first_use: bool, done: Instant) {
        match outcome {
            Ok(()) => {
                self.ok += 1;
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
            }
            Err(f) => {
                let code = f.code().to_string();
                let message = match f {
                    Failure::Status(_, message) | Failure::Mismatch(message) => message,
                    Failure::Rest(f) => f.message,
                };
                *self.errors.entry(code.clone()).or_default() += 1;
                self.first_message.entry(code).or_insert(message);
            }
        }
        self.first_use += u64::from(first_use);
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
    }

    /// Adds another worker's tally.
    fn merge(&mut self, other: Tally) {
        // ok: both histograms have the same bounds.
        let _ = self.hist.add(&other.hist);
        let _ = self.lag.add(&other.lag);
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (code, message) in other.first_message {
            self.first_message.entry(code).or_insert(message);
        }
        self.first_use += other.first_use;
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// One worker: one request in flight at a time.
async fn worker(shared: Arc<Shared>, mut clients: Vec<Caller>) -> Tally {
    let cycle = shared.workload.cycle();
    let connections = clients.len() as u64;
    let mut tally = Tally::new();
    loop {
        let (seq, intended) = match shared.rate {
            Some(rate) => {
                match shared.slots.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break, // closed: the run is over
                }
                // Slot `seq` was due at start + seq/rate, whenever a worker got free for it.
                let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
                (seq, shared.start + Duration::from_secs_f64(seq as f64 / rate))
            }
            None => {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                (shared.seq.fetch_add(1, Ordering::Relaxed), Instant::now())
            }
        };
        let sent = Instant::now();
        let c = &mut clients[(seq % connections) as usize];
        let outcome =
            match tokio::time::timeout(REQUEST_TIMEOUT, call(c, &shared.workload, shared.op, seq)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Failure::Status(
                    Code::DeadlineExceeded,
                    format!("no answer within {} s (client-side timeout)", REQUEST_TIMEOUT.as_secs()),
                )),
            };
        let done = Instant::now();
        let counter = if outcome.is_ok() { &shared.ok } else { &shared.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        if intended >= shared.measure_from {
            if shared.rate.is_some() {
                let lag =
                    u64::try_from(sent.saturating_duration_since(intended).as_micros()).unwrap_or(u64::MAX);
                tally.lag.saturating_record(lag.clamp(1, MAX_LATENCY_US));
            }
            let latency = done.saturating_duration_since(intended);
            if let Some(interval) = &shared.interval {
                let failed = outcome.as_ref().err().map(Failure::code);
                interval.lock().unwrap_or_else(|p| p.into_inner()).record(failed, latency);
            }
            tally.record(outcome, latency, seq < cycle, done);
        }
    }
    tally
}

/// Open loop: releases slot `i` at `start + i/rate` until `end` (a thread, for sub-millisecond
/// pacing; tokio's timer ticks in milliseconds).
fn pace(shared: Arc<Shared>, rate: f64, end: Instant) {
    let mut released: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end || shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let due = (now.saturating_duration_since(shared.start).as_secs_f64() * rate).floor() as u64 + 1;
        if due > released {
            shared.slots.add_permits(usize::try_from(due - released).unwrap_or(usize::MAX >> 4));
            released = due;
            shared.released.store(released, Ordering::Relaxed);
        }
        let next = shared.start + Duration::from_secs_f64(released as f64 / rate);
        let wait = next
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_micros(20), Duration::from_millis(1));
        std::thread::sleep(wait);
    }
}

/// Runs one measurement: warm-up, then `duration`, with a progress line each second. One worker
/// per lane (`plan.concurrency` of them), each sending on its lane's connections round-robin.
pub(super) async fn drive(
    label: &'static str,
    url: &str,
    lanes: Vec<Vec<Caller>>,
    workload: Arc<Workload>,
    plan: Plan,
) -> Report {
    let (keys, distinct) = (workload.targets.len(), workload.distinct);
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let shared = Arc::new(Shared {
        workload,
        op: plan.op,
        start,
        measure_from,
        rate: plan.rate,
        slots: Semaphore::new(0),
        released: AtomicU64::new(0),
        seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        interval: plan.report_every.map(|_| std::sync::Mutex::new(Interval::new())),
    });
    let pacer = plan.rate.map(|rate| {
        let shared = shared.clone();
        std::thread::spawn(move || pace(shared, rate, end))
    });
    let mut workers = JoinSet::new();
    for lane in lanes.into_iter().filter(|lane| !lane.is_empty()) {
        workers.spawn(worker(shared.clone(), lane));
    }
    let interrupted = progress(label, &plan, &shared, end).await;
    let stopped = Instant::now();
    shared.stop.store(true, Ordering::Relaxed);
    shared.slots.close();
    if let Some(pacer) = pacer {
        let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    }
    let mut tally = Tally::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(t) => tally.merge(t),
            Err(e) => eprintln!("loadtest: a worker failed: {e}"),
        }
    }
    let backlog = plan
        .rate
        .map(|_| shared.released.load(Ordering::Relaxed).saturating_sub(shared.seq.load(Ordering::Relaxed)));
    let measured_until = tally.last_done.map_or(stopped, |d| d.max(stopped));
    Report {
        label,
        server: url.to_string(),
        measured: measured_until.saturating_duration_since(measure_from),
        plan,
        keys,
        distinct,
        tally,
        backlog,
        interrupted,
    }
}

/// `--report-every`: prints the line of the interval from `*reported_to` to `to` (unless it is
/// empty in time) and moves `*reported_to` there.
fn report_interval(label: &str, shared: &Shared, reported_to: &mut Instant, to: Instant) {
    if let Some(interval) = &shared.interval
        && to > *reported_to
    {
        let secs = |t: Instant| t.saturating_duration_since(shared.measure_from).as_secs_f64();
        let mut interval = interval.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!("{}", interval.take_line(label, secs(*reported_to), secs(to)));
        *reported_to = to;
    }
}

/// Prints a progress line each second until `end` (false) or Ctrl-C (true).
async fn progress(label: &str, plan: &Plan, shared: &Shared, end: Instant) -> bool {
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at((shared.start + second).into(), second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let finished = tokio::time::sleep_until(end.into());
    tokio::pin!(finished);
    let interrupt = crate::cli::interrupted();
    tokio::pin!(interrupt);
    let (mut last_ok, mut last_at) = (0u64, shared.start);
    // `--report-every`: the end of the last interval reported (the intervals end every
    // `report_every` of the measurement; the last one where the run ends).
    let mut reported_to = shared.measure_from;
    loop {
        tokio::select! {
            _ = &mut finished => {
                report_interval(label, shared, &mut reported_to, end);
                return false;
            }
            _ = &mut interrupt => {
                eprintln!("loadtest: interrupted; reporting what was measured");
                return true;
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if let Some(every) = plan.report_every
                    && now >= reported_to + every
                {
                    let to = reported_to + every;
                    report_interval(label, shared, &mut reported_to, to);
                }
                let ok = shared.ok.load(Ordering::Relaxed);
                let per_second = (ok - last_ok) as f64 / now.saturating_duration_since(last_at).as_secs_f64();
                let phase = if last_at < shared.measure_from { "warm-up" } else { "measuring" };
                let backlog = match plan.rate {
                    Some(_) => format!(
                        "  backlog {}",
                        shared.released.load(Ordering::Relaxed).saturating_sub(shared.seq.load(Ordering::Relaxed))
                    ),
                    None => String::new(),
                };
                eprintln!(
                    "loadtest {label} {} {:>4.0}s {phase:<9} {per_second:>9.0} ok/s  errors {}{backlog}",
                    plan.op.name(),
                    now.saturating_duration_since(shared.start).as_secs_f64(),
                    shared.failed.load(Ordering::Relaxed),
                );
                (last_ok, last_at) = (ok, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_reports_its_own_requests_and_starts_the_next_empty() {
        let mut interval = Interval::new();
        for us in 1..=1000 {
            interval.record(None, Duration::from_micros(us));
        }
        interval.record(Some("UNAVAILABLE"), Duration::ZERO);
        interval.record(Some("UNAVAILABLE"), Duration::ZERO);
        interval.record(Some("MISMATCH"), Duration::ZERO);
        let line = interval.take_line("broker", 60.0, 120.0);
        assert!(line.starts_with("loadtest broker interval 60s-120s ok 1000 (17/s) "), "{line}");
        assert!(line.contains(" errors 3 MISMATCH=1,UNAVAILABLE=2 "), "{line}");
        assert!(line.contains(" p50 500 p90 900 p99 990 p99.9 999 max 1000 us"), "{line}");
        let next = interval.take_line("broker", 120.0, 180.0);
        assert!(next.ends_with("ok 0 (0/s) errors 0 p50 0 p90 0 p99 0 p99.9 0 max 0 us"), "{next}");
    }

    #[test]
    fn tallies_merge_counts_and_latencies() {
        let mut a = Tally::new();
        let now = Instant::now();
        a.record(Ok(()), Duration::from_micros(100), true, now);
        a.record(Err(Failure::Mismatch("x".into())), Duration::from_micros(5), false, now);
        let mut b = Tally::new();
        b.record(Ok(()), Duration::from_micros(300), false, now);
        b.record(Err(Failure::Status(Code::Unavailable, "down".into())), Duration::ZERO, false, now);
        b.record(Err(Failure::Mismatch("y".into())), Duration::ZERO, false, now);
        a.merge(b);
        assert_eq!(a.ok, 2);
        assert_eq!(a.first_use, 1);
        assert_eq!(a.errors, BTreeMap::from([("MISMATCH".into(), 2), ("UNAVAILABLE".into(), 1)]));
        assert_eq!(a.first_message["MISMATCH"], "x");
        assert_eq!(a.hist.len(), 2);
        assert!(a.hist.max() >= 300 && a.hist.min() <= 100);
    }
}
