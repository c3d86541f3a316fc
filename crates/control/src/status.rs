//! The status document `/v1/status` serves and `cutover status` prints, and
//! the backend health record the prober keeps current.

use serde::{Deserialize, Serialize};
use std::sync::Mutex;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    pub phase: String,
    /// `old` or `new`.
    #[serde(default)]
    pub primary: String,
    /// The read dial: percentage of eligible reads served by new.
    #[serde(default)]
    pub read_percent: u8,
    /// The secondary missed a commit's sync timeout and has not caught up.
    #[serde(default)]
    pub secondary_lagging: bool,
    /// The last promote or rollback pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pause: Option<serde_json::Value>,
    /// A promote or rollback holds new statements back right now.
    #[serde(default)]
    pub write_paused: bool,
    pub clients: i64,
    pub backends: Vec<BackendStatus>,
    /// Copy progress, stream position and lag while mirroring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<serde_json::Value>,
    /// The current or last verify run started from the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<serde_json::Value>,
    /// The current or last guarded ramp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    /// `old` or `new`.
    pub name: String,
    /// `primary` or `secondary`.
    pub role: String,
    pub address: String,
    pub database: String,
    /// None until the first probe finished.
    pub healthy: Option<bool>,
    pub last_error: Option<String>,
    pub pool: Option<PoolStatus>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub size: u32,
    pub in_use: i64,
    pub idle: i64,
    pub waiting: i64,
}

/// The latest probe result for one backend.
#[derive(Default)]
pub struct Health {
    last: Mutex<Option<Result<(), String>>>,
}

impl Health {
    pub fn record(&self, result: Result<(), String>) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
    }

    /// (healthy, last error) as the status document shows them.
    pub fn view(&self) -> (Option<bool>, Option<String>) {
        match &*self.last.lock().unwrap_or_else(|p| p.into_inner()) {
            None => (None, None),
            Some(Ok(())) => (Some(true), None),
            Some(Err(e)) => (Some(false), Some(e.clone())),
        }
    }
}
