//! Control state shared by the data path and the control plane: the
//! migration phase and the metrics registry. It does no I/O; the admin crate
//! serves it and the proxy updates it.

pub mod metrics;
pub mod phase;

pub use metrics::{BackendMetrics, Metrics, StreamMetrics, TrafficMetrics};
pub use phase::{Backend, ControlState, Phase, Refusal};
pub use prometheus::IntCounterVec;
pub mod status;
pub use status::{BackendStatus, Health, PoolStatus, Status};
