//! Wire definitions shared by the agent, the collector and `ztctl`: the
//! `.proto` files under `proto/` and the tonic/prost code generated from them.

/// Agent → collector telemetry (`zt.telemetry.v1`).
///
/// `Event.kind` is a oneof of messages of very different sizes (a decision
/// carries a dozen strings); boxing the large ones would cost an allocation
/// per event for no gain, since events live only as long as a batch.
#[allow(clippy::large_enum_variant)]
pub mod telemetry {
    tonic::include_proto!("zt.telemetry.v1");
}

/// Collector control and status API (`zt.control.v1`).
pub mod control {
    tonic::include_proto!("zt.control.v1");
}

/// Device enrollment and certificate renewal (`zt.enrollment.v1`).
pub mod enrollment {
    tonic::include_proto!("zt.enrollment.v1");
}

/// The SOC's query API (`zt.query.v1`): incidents, events, fleet, KPI; its
/// messages are also the HTTP/JSON bodies.
pub mod query {
    tonic::include_proto!("zt.query.v1");
}
