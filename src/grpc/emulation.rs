//! The `Emulation` service (admin only): the broker's clock, injected faults, throttling.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::{self, emulation_server::Emulation};
use super::{caller, to_status};
use crate::broker::Broker;
use crate::broker::faults::{FaultCode, FaultSpec};
use crate::broker::throttle::ThrottleProfile;
use crate::model::BrokerError;

const CLOCK_READ: &str = "Microsoft.TdeBroker/emulation/read";
const CLOCK_WRITE: &str = "Microsoft.TdeBroker/emulation/write";

/// The service implementation.
pub struct EmulationService {
    broker: Arc<Broker>,
}

impl EmulationService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        EmulationService { broker }
    }

    fn reply(&self, now: i64) -> Response<proto::ClockResponse> {
        Response::new(proto::ClockResponse { now, manual: self.broker.clock.is_manual() })
    }

    /// After the clock moved, what has come due happens at once (soft-deleted keys past their
    /// retention are purged).
    async fn clock_moved(&self, now: i64) -> Result<Response<proto::ClockResponse>, Status> {
        self.broker.purge_expired().await.map_err(to_status)?;
        // Probes that came due while the clock jumped run now.
        self.broker.probe_if_due().await.map_err(to_status)?;
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
        self.broker.authorize_control(&caller.object_id, CLOCK_WRITE, "/").map_err(to_status)?;
        let now = self.broker.clock.advance(request.get_ref().seconds).map_err(to_status)?;
        self.clock_moved(now).await
    }

    async fn set_clock(
        &self,
        request: Request<proto::SetClockRequest>,
    ) -> Result<Response<proto::ClockResponse>, Status> {
        let caller = caller(&request)?;
        self.broker.authorize_control(&caller.object_id, CLOCK_WRITE, "/").map_err(to_status)?;
        let now = self.broker.clock.set(request.get_ref().now).map_err(to_status)?;
        self.clock_moved(now).await
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
