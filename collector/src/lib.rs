//! `zt-collector`: receives agent telemetry over gRPC, stores it in
//! ClickHouse in batches, and answers status queries.
//!
//! One module per role:
//! - [`config`]: the typed, layered configuration;
//! - [`storage`]: the ClickHouse client, schema migrations, row types;
//! - [`writer`]: the batch writers, one per table (a sans-IO [`writer::Batcher`]
//!   and a task each);
//! - [`ingest`]: the `Telemetry` service and event validation;
//! - [`control`]: the `Control` status service;
//! - [`control_plane`]: CA, enrollment tokens, device registry, revocations,
//!   the collector's TLS configuration;
//! - [`enrollment`]: the `Enrollment` service (enroll, renew);
//! - [`admin`]: the `Admin` service for people (tokens, devices,
//!   revocation), authorised by role and audited;
//! - [`fleet`]: the `Fleet` service for agents (heartbeats, the control
//!   channel);
//! - [`distribution`], [`policy_store`], [`rollout`]: signed policy
//!   bundles, which device gets which, staged (canary) rollouts;
//! - [`detection`], [`incidents`]: the rule engine on the live stream,
//!   alerts grouped into incidents, stored in `zt.incidents`;
//! - [`query`]: the SOC's API (incidents, events, fleet, KPI) over gRPC
//!   and HTTP/JSON;
//! - [`console`]: the SOC web console's files, accounts and sessions;
//! - [`metrics`]: counters and gauges;
//! - [`server`]: wiring, start-up and graceful shutdown.
//!
//! The binary calls [`CollectorConfig::load`] and [`run`].

pub mod admin;
pub mod config;
pub mod console;
pub mod control;
pub mod control_plane;
pub mod detection;
pub mod distribution;
pub mod enrollment;
pub mod fleet;
pub mod incidents;
pub mod ingest;
pub mod metrics;
pub mod policy_store;
pub mod query;
pub mod replay;
pub mod rollout;
pub mod server;
pub mod storage;
pub mod writer;

pub use config::{CliArgs, CollectorConfig, ConfigError, LogFormat};
pub use server::{run, start, RunError, RunningCollector};
