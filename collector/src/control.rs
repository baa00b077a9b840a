//! The `zt.control.v1.Control` gRPC service: collector status for `ztctl`,
//! from the metrics and a live ClickHouse ping.

use std::{sync::Arc, time::Duration};

use proto::control::{control_server::Control, StatusReply, StatusRequest};
use tonic::{Request, Response, Status};

use crate::{metrics::Metrics, storage::Storage};

/// How long the status call waits for ClickHouse.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The control service. It has no error type of its own: an unreachable
/// ClickHouse is part of the status, not a failure of the call.
#[derive(Clone)]
pub struct ControlService {
    storage: Storage,
    metrics: Arc<Metrics>,
}

impl ControlService {
    pub fn new(storage: Storage, metrics: Arc<Metrics>) -> ControlService {
        ControlService { storage, metrics }
    }

    /// The status as the RPC returns it.
    pub async fn status_reply(&self) -> StatusReply {
        let ping = self.storage.ping(PING_TIMEOUT).await;
        let m = self.metrics.snapshot();
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            clickhouse_reachable: ping.is_ok(),
            clickhouse_error: ping.err().map(|e| e.to_string()).unwrap_or_default(),
            connected_agents: u32::try_from(m.connected_agents).unwrap_or(u32::MAX),
            events_stored: m.events_stored,
            events_rejected: m.events_rejected,
            insert_failures: m.insert_failures,
            uptime_seconds: m.uptime.as_secs(),
        }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        crate::enrollment::caller_identity(&request)?;
        Ok(Response::new(self.status_reply().await))
    }
}
