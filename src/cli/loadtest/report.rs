//! The report of a load test run: throughput, errors by gRPC code, latency percentiles and
//! the open loop's backlog and send lag, as JSON or aligned fields; and broker ÷ baseline.

use std::time::Duration;

use serde_json::{Value, json};

use super::drive::Tally;
use super::{ALGORITHM, LoadtestError, Op, Plan};
use crate::cli::render::fields;

/// The result of one run.
pub(super) struct Report {
    /// `broker`, `baseline` or (REST runs with `--with-grpc`) `broker-grpc`.
    pub(super) label: &'static str,
    /// The URL driven.
    pub(super) server: String,
    /// The load.
    pub(super) plan: Plan,
    /// Keys (targets) the requests cycled over.
    pub(super) keys: usize,
    /// Ciphertexts per key.
    pub(super) distinct: usize,
    /// From the end of the warm-up to the last recorded answer (or the stop).
    pub(super) measured: Duration,
    /// What the workers measured.
    pub(super) tally: Tally,
    /// Open loop: slots released but never sent (every in-flight slot was busy).
    pub(super) backlog: Option<u64>,
    /// Ctrl-C ended the run early.
    pub(super) interrupted: bool,
}

impl Report {
    /// Failed measured requests.
    fn errors(&self) -> u64 {
        self.tally.errors.values().sum()
    }

    /// Measured requests.
    fn requests(&self) -> u64 {
        self.tally.ok + self.errors()
    }

    /// OK requests per second measured.
    fn throughput(&self) -> f64 {
        let secs = self.measured.as_secs_f64();
        if secs > 0.0 { self.tally.ok as f64 / secs } else { 0.0 }
    }

    /// The share of measured requests that were the first use of their ciphertext: what an
    /// unbounded unwrap cache misses (a bounded one, or a TTL, may miss more). The baseline
    /// unwraps nothing, so it has none.
    fn cache_miss_share(&self) -> Option<f64> {
        (self.label != "baseline" && self.plan.op.unwraps() && self.requests() > 0)
            .then(|| self.tally.first_use as f64 / self.requests() as f64)
    }

    /// Latency percentile in µs (0 when nothing succeeded).
    fn p(&self, quantile: f64) -> u64 {
        if self.tally.ok == 0 { 0 } else { self.tally.hist.value_at_quantile(quantile) }
    }

    /// Highest latency in µs (0 when nothing succeeded).
    fn max(&self) -> u64 {
        if self.tally.ok == 0 { 0 } else { self.tally.hist.max() }
    }

    /// The report as a JSON document.
    pub(super) fn json(&self) -> Value {
        let h = &self.tally.hist;
        let has = self.tally.ok > 0;
        json!({
            "target": self.label,
            "server": self.server,
            "protocol": self.plan.protocol,
            "op": self.plan.op.name(),
            "algorithm": ALGORITHM,
            "load": {
                "mode": if self.plan.rate.is_some() { "open" } else { "closed" },
                "rate": self.plan.rate,
                "concurrency": self.plan.concurrency,
                "connections": self.plan.connections,
                "duration_s": self.plan.duration.as_secs_f64(),
                "warmup_s": self.plan.warmup.as_secs_f64(),
            },
            "keys": self.keys,
            "distinct_ciphertexts": self.distinct,
            "cache_miss_share": self.cache_miss_share(),
            "measured_s": self.measured.as_secs_f64(),
            "requests": self.requests(),
            "ok": self.tally.ok,
            "throughput_ok_per_s": self.throughput(),
            "errors": {
                "total": self.errors(),
                "by_code": self.tally.errors,
                "first_message": self.tally.first_message,
            },
            "latency_us": {
                "min": if has { h.min() } else { 0 },
                "mean": if has { h.mean() } else { 0.0 },
                "p50": self.p(0.5),
                "p90": self.p(0.9),
                "p99": self.p(0.99),
                "p99_9": self.p(0.999),
                "max": self.max(),
            },
            "send_lag_us": self.plan.rate.map(|_| {
                let lag = &self.tally.lag;
                let at = |q| if lag.is_empty() { 0 } else { lag.value_at_quantile(q) };
                json!({ "p50": at(0.5), "p99": at(0.99), "max": if lag.is_empty() { 0 } else { lag.max() } })
            }),
            "backlog": self.backlog,
            "interrupted": self.interrupted,
        })
    }

    /// The report as aligned fields.
    pub(super) fn table(&self) -> String {
        let plan = &self.plan;
        let mut workload = format!("{} ({ALGORITHM}), {} keys", plan.op.name(), self.keys);
        if plan.op != Op::Get {
            workload.push_str(&format!(" × {} DEKs", self.distinct));
        }
        let load = match plan.rate {
            Some(rate) => format!("open loop at {rate}/s, at most {} in flight", plan.concurrency),
            None => format!("closed loop, {} in flight", plan.concurrency),
        };
        let mut rows = vec![
            (self.label.to_string(), self.server.clone()),
            ("protocol".to_string(), self.plan.protocol.to_string()),
            ("op".to_string(), workload),
            (
                "load".to_string(),
                format!(
                    "{load} over {} connections; {:.2} s measured after {:.2} s warm-up{}",
                    plan.connections,
                    self.measured.as_secs_f64(),
                    plan.warmup.as_secs_f64(),
                    if self.interrupted { " (interrupted)" } else { "" }
                ),
            ),
            ("ok".to_string(), format!("{} ({:.0}/s)", self.tally.ok, self.throughput())),
        ];
        let errors = if self.tally.errors.is_empty() {
            "0".to_string()
        } else {
            let by_code: Vec<String> = self.tally.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let first: Vec<String> =
                self.tally.first_message.iter().map(|(c, m)| format!("{c}: {m}")).collect();
            format!("{} ({}); first: {}", self.errors(), by_code.join(", "), first.join("; "))
        };
        rows.push(("errors".to_string(), errors));
        rows.push((
            "latency µs".to_string(),
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                self.p(0.5),
                self.p(0.9),
                self.p(0.99),
                self.p(0.999),
                self.max()
            ),
        ));
        if let Some(share) = self.cache_miss_share() {
            rows.push((
                "cache-miss share".to_string(),
                format!("{:.2}% (first use of a ciphertext)", share * 100.0),
            ));
        }
        if let Some(backlog) = self.backlog {
            rows.push(("backlog".to_string(), format!("{backlog} slots never sent (all in flight)")));
        }
        if self.plan.rate.is_some() && !self.tally.lag.is_empty() {
            let lag = &self.tally.lag;
            rows.push((
                "send lag µs".to_string(),
                format!(
                    "p50 {}  p99 {}  max {} (intended send time → sent; part of the latency)",
                    lag.value_at_quantile(0.5),
                    lag.value_at_quantile(0.99),
                    lag.max()
                ),
            ));
        }
        fields(&rows)
    }

    /// Fails when any measured request failed.
    pub(super) fn verdict(&self) -> Result<(), LoadtestError> {
        match self.errors() {
            0 => Ok(()),
            failed => Err(LoadtestError::Failed { label: self.label, failed, requests: self.requests() }),
        }
    }
}

/// One run's figures over another's: broker ÷ baseline, or REST ÷ gRPC.
pub(super) struct Ratios {
    /// `broker/baseline` or `rest/grpc`.
    name: &'static str,
    /// Of the OK requests per second.
    throughput: Option<f64>,
    /// Of the median latency.
    p50: Option<f64>,
    /// Of the 99th percentile latency.
    p99: Option<f64>,
}

impl Ratios {
    /// `a`'s figures over `b`'s, called `name`.
    pub(super) fn of(name: &'static str, broker: &Report, baseline: &Report) -> Self {
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        Ratios {
            name,
            throughput: ratio(broker.throughput(), baseline.throughput()),
            p50: ratio(broker.p(0.5) as f64, baseline.p(0.5) as f64),
            p99: ratio(broker.p(0.99) as f64, baseline.p(0.99) as f64),
        }
    }

    /// The ratios as a JSON object.
    pub(super) fn json(&self) -> Value {
        json!({ "throughput": self.throughput, "p50": self.p50, "p99": self.p99 })
    }

    /// The ratios as one aligned field.
    pub(super) fn table(&self) -> String {
        let f = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
        fields(&[(
            self.name.to_string(),
            format!("throughput {}  p50 {}  p99 {}", f(self.throughput), f(self.p50), f(self.p99)),
        )])
    }
}
