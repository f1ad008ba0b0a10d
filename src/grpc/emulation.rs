//! The `Emulation` service: the broker's clock (admin only).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::{self, emulation_server::Emulation};
use super::{caller, to_status};
use crate::broker::Broker;
use crate::broker::faults::FaultSpec;

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
        let list = self
            .broker
            .set_faults(&caller, &r.vault_name, FaultSpec { outage: r.outage })
            .await
            .map_err(to_status)?;
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
}

fn faults(list: Vec<(String, FaultSpec)>) -> proto::FaultsResponse {
    proto::FaultsResponse {
        faults: list
            .into_iter()
            .map(|(vault_name, f)| proto::VaultFaults { vault_name, outage: f.outage })
            .collect(),
    }
}
