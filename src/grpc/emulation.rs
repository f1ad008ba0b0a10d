//! The `Emulation` service (admin only): the broker's clock, injected faults, throttling,
//! statistics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::proto::{self, emulation_server::Emulation};
use super::{caller, to_status};
use crate::broker::Broker;
use crate::broker::clock::ClockMove;
use crate::broker::faults::{FaultCode, FaultSpec};
use crate::broker::state::State;
use crate::broker::throttle::ThrottleProfile;
use crate::model::BrokerError;
use crate::model::principal::PrincipalKind;
use crate::model::server::DbState;

const CLOCK_READ: &str = "Microsoft.TdeBroker/emulation/read";

/// The service implementation.
pub struct EmulationService {
    broker: Arc<Broker>,
    /// When serving began (GetStats' uptime).
    started: Instant,
}

impl EmulationService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        EmulationService { broker, started: Instant::now() }
    }

    fn reply(&self, now: i64) -> Response<proto::ClockResponse> {
        Response::new(proto::ClockResponse { now, manual: self.broker.clock.is_manual() })
    }

    async fn move_clock(
        &self,
        caller: &crate::model::Caller,
        movement: ClockMove,
    ) -> Result<Response<proto::ClockResponse>, Status> {
        let now = self.broker.move_clock(caller, movement).await.map_err(to_status)?;
        Ok(self.reply(now))
    }
}

#[tonic::async_trait]
impl Emulation for EmulationService {
    async fn get_clock(
        &self,
        request: Request<proto::GetClockRequest>,
    ) -> Result<Response<proto::ClockResponse>, Status> {
        let caller = caller(&request)?;
        self.broker.authorize_control(&caller.object_id, CLOCK_READ, "/").map_err(to_status)?;
        Ok(self.reply(self.broker.clock.now()))
    }

    async fn advance_clock(
        &self,
        request: Request<proto::AdvanceClockRequest>,
    ) -> Result<Response<proto::ClockResponse>, Status> {
        let caller = caller(&request)?;
        self.move_clock(&caller, ClockMove::By(request.get_ref().seconds)).await
    }

    async fn set_clock(
        &self,
        request: Request<proto::SetClockRequest>,
    ) -> Result<Response<proto::ClockResponse>, Status> {
        let caller = caller(&request)?;
        self.move_clock(&caller, ClockMove::To(request.get_ref().now)).await
    }

    async fn set_faults(
        &self,
        request: Request<proto::SetFaultsRequest>,
    ) -> Result<Response<proto::FaultsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let spec = FaultSpec {
            outage: r.outage,
            latency_ms: r.latency_ms,
            latency_p50_ms: r.latency_p50_ms,
            latency_p99_ms: r.latency_p99_ms,
            error_rate: r.error_rate,
            error_code: FaultCode::parse(&r.error_code).map_err(to_status)?,
            fail_next: r.fail_next,
        };
        let list = self.broker.set_faults(&caller, &r.vault_name, spec).await.map_err(to_status)?;
        Ok(Response::new(faults(list)))
    }

    async fn clear_faults(
        &self,
        request: Request<proto::ClearFaultsRequest>,
    ) -> Result<Response<proto::FaultsResponse>, Status> {
        let caller = caller(&request)?;
        let list =
            self.broker.clear_faults(&caller, &request.get_ref().vault_name).await.map_err(to_status)?;
        Ok(Response::new(faults(list)))
    }

    async fn set_throttling(
        &self,
        request: Request<proto::SetThrottlingRequest>,
    ) -> Result<Response<proto::ThrottlingResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let profile = throttle_profile(r).map_err(to_status)?;
        let list = self.broker.set_throttling(&caller, &r.vault_name, profile).map_err(to_status)?;
        Ok(Response::new(throttling(list)))
    }

    async fn get_throttling(
        &self,
        request: Request<proto::GetThrottlingRequest>,
    ) -> Result<Response<proto::ThrottlingResponse>, Status> {
        let caller = caller(&request)?;
        let list = self.broker.get_throttling(&caller).map_err(to_status)?;
        Ok(Response::new(throttling(list)))
    }

    async fn get_stats(
        &self,
        request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::StatsResponse>, Status> {
        let caller = caller(&request)?;
        self.broker.authorize_control(&caller.object_id, CLOCK_READ, "/").map_err(to_status)?;
        Ok(Response::new(self.stats()))
    }
}

impl EmulationService {
    /// GetStats' answer: this broker's figures and the process's counters.
    fn stats(&self) -> proto::StatsResponse {
        let (epoch, objects, databases) = {
            // Counting only, under the read lock: no I/O, no crypto.
            let st = self.broker.read();
            (st.epoch, object_counts(&st), database_counts(&st))
        };
        let m = crate::telemetry::metrics().snapshot();
        let caches = self
            .broker
            .caches
            .figures()
            .into_iter()
            .map(|f| {
                let (hits, misses) = m.cache(f.name);
                proto::CacheStats {
                    name: f.name.to_string(),
                    enabled: f.enabled,
                    hits,
                    misses,
                    entries: f.entries,
                    capacity: f.capacity,
                    ttl_seconds: i64::try_from(f.ttl.as_secs()).unwrap_or(i64::MAX),
                }
            })
            .collect();
        proto::StatsResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: i64::try_from(self.started.elapsed().as_secs()).unwrap_or(i64::MAX),
            now: self.broker.clock.now(),
            epoch,
            objects: Some(objects),
            databases: Some(databases),
            requests: m
                .requests
                .into_iter()
                .map(|r| proto::RequestCount {
                    service: r.service,
                    method: r.method,
                    outcome: r.outcome,
                    count: r.count,
                })
                .collect(),
            latencies: m
                .latencies
                .into_iter()
                .map(|l| {
                    let total_seconds = l.sum.as_secs_f64();
                    proto::MethodLatency {
                        service: l.service,
                        method: l.method,
                        count: l.count,
                        total_seconds,
                        mean_ms: if l.count == 0 { 0.0 } else { total_seconds * 1000.0 / l.count as f64 },
                    }
                })
                .collect(),
            caches,
            rsa_operations: m
                .rsa_operations
                .into_iter()
                .map(|(op, count)| proto::RsaOperationCount { op, count })
                .collect(),
            throttled_requests: self.broker.throttle.refused(),
            injected_errors: self.broker.faults.injected(),
            audit_write_failures: m.audit_failures,
        }
    }
}

/// Objects of the state by kind.
fn object_counts(st: &State) -> proto::ObjectCounts {
    let mut c = proto::ObjectCounts {
        vaults: st.vaults.len() as u64,
        servers: st.servers.len() as u64,
        databases: st.databases.len() as u64,
        role_assignments: st.role_assignments.len() as u64,
        subnets: st.subnets.len() as u64,
        ..Default::default()
    };
    for k in st.vaults.values().flat_map(|ve| ve.keys.values()) {
        if k.key.deleted.is_some() {
            c.deleted_keys += 1;
        } else {
            c.keys += 1;
            c.key_versions += k.key.versions.len() as u64;
        }
    }
    for p in st.principals.values() {
        match p.kind {
            PrincipalKind::User => c.users += 1,
            PrincipalKind::UserAssignedIdentity => c.user_assigned_identities += 1,
            PrincipalKind::SystemAssignedIdentity => c.system_assigned_identities += 1,
            PrincipalKind::ServerHost => c.engine_hosts += 1,
        }
    }
    c
}

/// Databases by state, the inaccessible ones also by reason.
fn database_counts(st: &State) -> proto::DatabaseCounts {
    let mut c = proto::DatabaseCounts::default();
    let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
    for d in st.databases.values() {
        match d.state {
            DbState::Online => c.online += 1,
            DbState::Inaccessible => {
                c.inaccessible += 1;
                *reasons.entry(d.reason.map_or("", |r| r.name())).or_default() += 1;
            }
        }
    }
    c.inaccessible_by_reason = reasons
        .into_iter()
        .map(|(reason, count)| proto::ReasonCount { reason: reason.to_string(), count })
        .collect();
    c
}

/// The request's profile; `None` = "inherit".
fn throttle_profile(r: &proto::SetThrottlingRequest) -> Result<Option<ThrottleProfile>, BrokerError> {
    let limits_given = r.all_other_per_10s != 0 || r.create_per_10s != 0;
    let profile = match r.profile.trim().to_ascii_lowercase().as_str() {
        "custom" => {
            return Ok(Some(ThrottleProfile::Custom {
                all_other_per_10s: r.all_other_per_10s,
                create_per_10s: r.create_per_10s,
            }));
        }
        "off" => Some(ThrottleProfile::Off),
        "azure" => Some(ThrottleProfile::Azure),
        "inherit" => None,
        other => {
            return Err(BrokerError::bad_parameter(format!(
                "The throttling profile '{}' is not supported. Supported profiles are off, azure, custom and inherit.",
                crate::model::ids::printable(other)
            )));
        }
    };
    if limits_given {
        return Err(BrokerError::bad_parameter(
            "all_other_per_10s and create_per_10s are the limits of the custom profile only.",
        ));
    }
    Ok(profile)
}

fn throttling(list: Vec<(String, ThrottleProfile)>) -> proto::ThrottlingResponse {
    proto::ThrottlingResponse {
        throttling: list
            .into_iter()
            .map(|(vault_name, p)| {
                let (all_other_per_10s, create_per_10s) = p.limits().unwrap_or((0, 0));
                proto::VaultThrottling {
                    vault_name,
                    profile: p.name().to_string(),
                    all_other_per_10s,
                    create_per_10s,
                }
            })
            .collect(),
    }
}

fn faults(list: Vec<(String, FaultSpec)>) -> proto::FaultsResponse {
    proto::FaultsResponse {
        faults: list
            .into_iter()
            .map(|(vault_name, f)| proto::VaultFaults {
                vault_name,
                outage: f.outage,
                latency_ms: f.latency_ms,
                latency_p50_ms: f.latency_p50_ms,
                latency_p99_ms: f.latency_p99_ms,
                error_rate: f.error_rate,
                error_code: if f.error_rate > 0.0 { f.error_code.name().to_string() } else { String::new() },
                fail_next: f.fail_next,
            })
            .collect(),
    }
}
