//! `clock …`, `faults …`, `throttling …` and `stats`: the Emulation service of the broker (its
//! clock, injected faults, Key Vault throttling, counters), from the command line.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::error::{ArgError, CliError};
use super::render::{Out, fields, json_array, json_fields, list_out, table, vault_or_star, when};
use super::session::Session;
use crate::broker::throttle::AZURE_CREATE_PER_10S;
use crate::grpc::proto;

/// `tde-broker clock …`
#[derive(Debug, clap::Subcommand)]
pub enum ClockCmd {
    /// Show the broker's time.
    Show,
    /// Move a manual clock: seconds, or a number with s, m, h, d or w (90d, 25h, -30m).
    Advance {
        /// How far, e.g. 3600, 2h, 90d; negative moves back.
        #[arg(value_name = "SECONDS", allow_hyphen_values = true, value_parser = parse_duration)]
        seconds: i64,
    },
    /// Set a manual clock to a time.
    Set {
        /// Unix seconds, RFC 3339 (2027-01-15T08:00:00Z, 2027-01-15), or a move from the broker's
        /// now (+1h, -30m, +90d).
        #[arg(value_name = "TIME", allow_hyphen_values = true, value_parser = super::when::parse_when)]
        now: super::when::When,
    },
}

/// `tde-broker faults …`
#[derive(Debug, clap::Subcommand)]
pub enum FaultsCmd {
    /// Inject faults into one vault (or every vault), replacing the ones set there before.
    #[command(group(clap::ArgGroup::new("fault").required(true).multiple(true).args([
        "outage", "latency_ms", "latency_p50_ms", "error_rate", "fail_next",
    ])))]
    Set {
        /// Vault name [default: every vault].
        #[arg(long, value_name = "NAME")]
        vault: Option<String>,
        /// The vault answers every data-plane call with UNAVAILABLE (ServiceUnavailable).
        #[arg(long)]
        outage: bool,
        /// Fixed delay added to every data-plane call.
        #[arg(long, value_name = "MS")]
        latency_ms: Option<u32>,
        /// Median of a random (log-normal) delay added on top.
        #[arg(long, value_name = "MS")]
        latency_p50_ms: Option<u32>,
        /// 99th percentile of that delay [default: the median, a fixed delay].
        #[arg(long, value_name = "MS", requires = "latency_p50_ms")]
        latency_p99_ms: Option<u32>,
        /// Probability (0..1) that a data-plane call fails with --error-code.
        #[arg(long, value_name = "P")]
        error_rate: Option<f64>,
        /// UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL or PERMISSION_DENIED [default: UNAVAILABLE].
        #[arg(long, value_name = "CODE", requires = "error_rate")]
        error_code: Option<String>,
        /// The next N data-plane calls fail with UNAVAILABLE.
        #[arg(long, value_name = "N")]
        fail_next: Option<u32>,
    },
    /// Remove the faults set on one vault, or (without --vault) every fault.
    Clear {
        /// Vault name [default: every fault, per vault and for every vault].
        #[arg(long, value_name = "NAME")]
        vault: Option<String>,
    },
}

/// `tde-broker throttling …`
#[derive(Debug, clap::Subcommand)]
pub enum ThrottlingCmd {
    /// Show the profile and budgets per 10 s of every vault (`*`) and of the vaults with their own.
    Show,
    /// Throttle one vault (or every vault): --profile azure (the cloud's limits) or off, or own
    /// limits (--all-other); its 10-second windows start afresh.
    #[command(group(clap::ArgGroup::new("throttle").required(true).args(["profile", "all_other"])))]
    Set {
        /// Vault name [default: every vault; vaults with their own profile keep it].
        #[arg(long, value_name = "NAME")]
        vault: Option<String>,
        /// off, azure, or (with --vault) inherit: the vault follows the profile of every vault again.
        #[arg(long, value_name = "PROFILE")]
        profile: Option<String>,
        /// Own limits: "all other" requests per vault and 10 s, in RSA-2048 software key operations
        /// (bigger and HSM keys weigh more, as in the cloud).
        #[arg(long, value_name = "N")]
        all_other: Option<u32>,
        /// Own limits: CREATE requests (create, import, rotate, restore) per vault and 10 s
        /// [default: 20, the cloud's].
        #[arg(long, value_name = "N", requires = "all_other", conflicts_with = "profile")]
        create: Option<u32>,
    },
}

/// `clock …`.
pub(super) async fn clock(s: &Session, cmd: ClockCmd) -> Result<Out, CliError> {
    let c = match cmd {
        ClockCmd::Show => s.call(s.emulation().get_clock(proto::GetClockRequest {})).await?,
        ClockCmd::Advance { seconds } => {
            s.call(s.emulation().advance_clock(proto::AdvanceClockRequest { seconds })).await?
        }
        ClockCmd::Set { now } => {
            let now = now.resolve(s).await?;
            s.call(s.emulation().set_clock(proto::SetClockRequest { now })).await?
        }
    };
    Ok(Out {
        json: json!({ "now": c.now, "manual": c.manual }),
        table: fields(&[("now", when(c.now)), ("manual", c.manual.to_string())]),
    })
}

/// `faults …`.
pub(super) async fn faults(s: &Session, cmd: FaultsCmd) -> Result<Out, CliError> {
    let list = match cmd {
        FaultsCmd::Set {
            vault,
            outage,
            latency_ms,
            latency_p50_ms,
            latency_p99_ms,
            error_rate,
            error_code,
            fail_next,
        } => {
            let request = proto::SetFaultsRequest {
                vault_name: vault.unwrap_or_default(),
                outage,
                latency_ms: latency_ms.unwrap_or_default(),
                latency_p50_ms: latency_p50_ms.unwrap_or_default(),
                latency_p99_ms: latency_p99_ms.unwrap_or_default(),
                error_rate: error_rate.unwrap_or_default(),
                error_code: error_code.unwrap_or_default(),
                fail_next: fail_next.unwrap_or_default(),
            };
            s.call(s.emulation().set_faults(request)).await?
        }
        FaultsCmd::Clear { vault } => {
            let request = proto::ClearFaultsRequest { vault_name: vault.unwrap_or_default() };
            s.call(s.emulation().clear_faults(request)).await?
        }
    };
    // An empty vault name stands for every vault: `*` in the table, "" in JSON (as on the wire).
    // Faults other than an outage are shown only where set (JSON fields, a table column).
    let others = |f: &proto::VaultFaults| {
        let mut o = serde_json::Map::new();
        let mut put = |k: &str, v: Value, set: bool| {
            if set {
                o.insert(k.to_string(), v);
            }
        };
        put("latency_ms", json!(f.latency_ms), f.latency_ms > 0);
        put("latency_p50_ms", json!(f.latency_p50_ms), f.latency_p50_ms > 0);
        put("latency_p99_ms", json!(f.latency_p99_ms), f.latency_p99_ms > 0);
        put("error_rate", json!(f.error_rate), f.error_rate > 0.0);
        put("error_code", json!(f.error_code), f.error_rate > 0.0);
        put("fail_next", json!(f.fail_next), f.fail_next > 0);
        o
    };
    let any_others = list.faults.iter().any(|f| !others(f).is_empty());
    let json = |f: &proto::VaultFaults| {
        let mut o = others(f);
        o.insert("vault_name".into(), json!(f.vault_name));
        o.insert("outage".into(), json!(f.outage));
        Value::Object(o)
    };
    let headers: &[&str] = if any_others { &["VAULT", "OUTAGE", "OTHER"] } else { &["VAULT", "OUTAGE"] };
    Ok(list_out(&list.faults, json, headers, |f| {
        let mut row = vec![vault_or_star(&f.vault_name), f.outage.to_string()];
        if any_others {
            let o = others(f);
            let text = o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            row.push(if text.is_empty() { "-".to_string() } else { text.replace('"', "") });
        }
        row
    }))
}

/// `throttling …`.
pub(super) async fn throttling(s: &Session, cmd: ThrottlingCmd) -> Result<Out, CliError> {
    let list = match cmd {
        ThrottlingCmd::Show => s.call(s.emulation().get_throttling(proto::GetThrottlingRequest {})).await?,
        ThrottlingCmd::Set { vault, profile, all_other, create } => {
            // As the broker reads the request: limits make the custom profile; a named profile
            // goes as given (the broker checks it and the limits).
            let request = match all_other {
                Some(all_other) => proto::SetThrottlingRequest {
                    profile: "custom".to_string(),
                    all_other_per_10s: all_other,
                    create_per_10s: create.unwrap_or(AZURE_CREATE_PER_10S),
                    vault_name: vault.unwrap_or_default(),
                },
                None => proto::SetThrottlingRequest {
                    profile: profile.unwrap_or_default(),
                    all_other_per_10s: 0,
                    create_per_10s: 0,
                    vault_name: vault.unwrap_or_default(),
                },
            };
            s.call(s.emulation().set_throttling(request)).await?
        }
    };
    // An empty vault name stands for every vault: `*` in the table, "" in JSON (as on the wire).
    let limit = |t: &proto::VaultThrottling, n: u32| {
        if t.profile == "off" { "-".to_string() } else { n.to_string() }
    };
    let json =
        |t: &proto::VaultThrottling| json_fields!(t; vault_name, profile, all_other_per_10s, create_per_10s);
    Ok(list_out(&list.throttling, json, &["VAULT", "PROFILE", "ALL-OTHER/10S", "CREATE/10S"], |t| {
        vec![
            vault_or_star(&t.vault_name),
            t.profile.clone(),
            limit(t, t.all_other_per_10s),
            limit(t, t.create_per_10s),
        ]
    }))
}

/// `stats`.
pub(super) async fn stats(s: &Session) -> Result<Out, CliError> {
    let r = s.call(s.emulation().get_stats(proto::GetStatsRequest {})).await?;
    Ok(Out { json: stats_json(&r), table: stats_table(&r) })
}

/// The `stats` document: the response's fields under their wire names.
fn stats_json(r: &proto::StatsResponse) -> Value {
    let o = r.objects.unwrap_or_default();
    let d = r.databases.clone().unwrap_or_default();
    let mut json = json_fields!(r; version, uptime_seconds, now, epoch, throttled_requests, injected_errors, audit_write_failures);
    json["objects"] = json_fields!(o; vaults, keys, key_versions, deleted_keys, user_assigned_identities,
        system_assigned_identities, users, engine_hosts, servers, databases, role_assignments, subnets);
    let by_reason = json_array(&d.inaccessible_by_reason, |c| json_fields!(c; reason, count));
    json["databases"] =
        json!({ "online": d.online, "inaccessible": d.inaccessible, "inaccessible_by_reason": by_reason });
    json["requests"] = json_array(&r.requests, |c| json_fields!(c; service, method, outcome, count));
    json["latencies"] =
        json_array(&r.latencies, |l| json_fields!(l; service, method, count, total_seconds, mean_ms));
    json["caches"] = json_array(
        &r.caches,
        |c| json_fields!(c; name, enabled, hits, misses, entries, capacity, ttl_seconds),
    );
    json["rsa_operations"] = json_array(&r.rsa_operations, |c| json_fields!(c; op, count));
    json
}

/// The `stats` text: summary fields, then tables of caches, requests by method (outcomes
/// folded into one column) and RSA operations.
fn stats_table(r: &proto::StatsResponse) -> String {
    let o = r.objects.unwrap_or_default();
    let d = r.databases.clone().unwrap_or_default();
    let mut databases = format!("{} ({} online, {} inaccessible", o.databases, d.online, d.inaccessible);
    if !d.inaccessible_by_reason.is_empty() {
        let reasons: Vec<String> = d
            .inaccessible_by_reason
            .iter()
            .map(|c| format!("{} {}", if c.reason.is_empty() { "-" } else { &c.reason }, c.count))
            .collect();
        databases.push_str(&format!(": {}", reasons.join(", ")));
    }
    databases.push(')');
    let mut out = fields(&[
        ("version", r.version.clone()),
        ("uptime", uptime_text(r.uptime_seconds)),
        ("now", when(r.now)),
        ("epoch", r.epoch.to_string()),
        ("vaults", o.vaults.to_string()),
        ("keys", format!("{} ({} versions, {} deleted)", o.keys, o.key_versions, o.deleted_keys)),
        (
            "identities",
            format!(
                "{} user-assigned, {} system-assigned",
                o.user_assigned_identities, o.system_assigned_identities
            ),
        ),
        ("users", o.users.to_string()),
        ("engine hosts", o.engine_hosts.to_string()),
        ("servers", o.servers.to_string()),
        ("databases", databases),
        ("role assignments", o.role_assignments.to_string()),
        ("subnets", o.subnets.to_string()),
        ("throttled requests", r.throttled_requests.to_string()),
        ("injected errors", r.injected_errors.to_string()),
        ("audit write failures", r.audit_write_failures.to_string()),
    ]);

    let caches = r
        .caches
        .iter()
        .map(|c| {
            let lookups = c.hits + c.misses;
            let rate = if lookups == 0 {
                "-".to_string()
            } else {
                format!("{:.1}%", c.hits as f64 * 100.0 / lookups as f64)
            };
            let (capacity, ttl) = if c.enabled {
                (c.capacity.to_string(), format!("{}s", c.ttl_seconds))
            } else {
                ("-".to_string(), "-".to_string())
            };
            vec![
                c.name.clone(),
                if c.enabled { "on" } else { "off" }.to_string(),
                c.entries.to_string(),
                capacity,
                ttl,
                c.hits.to_string(),
                c.misses.to_string(),
                rate,
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["CACHE", "STATE", "ENTRIES", "CAPACITY", "TTL", "HITS", "MISSES", "HIT RATE"],
        caches,
    ));

    // One row per method: calls, mean latency, and the outcomes with their counts.
    let mut outcomes: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for c in &r.requests {
        outcomes.entry((&c.service, &c.method)).or_default().push(format!("{}={}", c.outcome, c.count));
    }
    let short = |service: &str| service.strip_prefix("tdebroker.v1.").unwrap_or(service).to_string();
    let rows: Vec<Vec<String>> = r
        .latencies
        .iter()
        .map(|l| {
            let o = outcomes
                .get(&(l.service.as_str(), l.method.as_str()))
                .map_or("-".to_string(), |v| v.join(","));
            vec![short(&l.service), l.method.clone(), l.count.to_string(), format!("{:.3}", l.mean_ms), o]
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no requests yet\n");
    } else {
        out.push_str(&table(&["SERVICE", "METHOD", "CALLS", "MEAN MS", "OUTCOMES"], rows));
    }

    if !r.rsa_operations.is_empty() {
        let rows = r.rsa_operations.iter().map(|c| vec![c.op.clone(), c.count.to_string()]).collect();
        out.push('\n');
        out.push_str(&table(&["RSA OP", "COUNT"], rows));
    }
    out
}

/// `1d 2h 3m 4s`, leading zero units left out.
fn uptime_text(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

/// Seconds, or a number with a unit: s, m, h, d, w (`90d`, `25h`, `-30m`).
pub(super) fn parse_duration(text: &str) -> Result<i64, ArgError> {
    let bad = || ArgError::ClockDuration(text.to_string());
    let t = text.trim();
    let (number, unit) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => (&t[..t.len() - 1], c.to_ascii_lowercase()),
        _ => (t, 's'),
    };
    let scale: i64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        'w' => 604_800,
        _ => return Err(bad()),
    };
    let n: i64 = number.trim().parse().map_err(|_| bad())?;
    n.checked_mul(scale).ok_or_else(|| ArgError::TooLarge(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration("-30m"), Ok(-1_800));
        assert_eq!(parse_duration(" 15 "), Ok(15));
        assert_eq!(parse_duration("2W"), Ok(2 * 604_800));
        assert_eq!(parse_duration("3x"), Err(ArgError::ClockDuration("3x".into())));
        assert_eq!(parse_duration("h"), Err(ArgError::ClockDuration("h".into())));
        let huge = format!("{}w", i64::MAX);
        assert_eq!(parse_duration(&huge), Err(ArgError::TooLarge(huge.clone())));
    }

    #[test]
    fn uptime_leaves_out_leading_zero_units() {
        assert_eq!(uptime_text(-5), "0s");
        assert_eq!(uptime_text(61), "1m 1s");
        assert_eq!(uptime_text(3_600), "1h 0m 0s");
        assert_eq!(uptime_text(90_061), "1d 1h 1m 1s");
    }
}
