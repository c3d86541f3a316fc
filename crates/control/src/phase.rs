//! The migration phase. Only `passthrough` is reachable until mirroring lands.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Every statement goes to the old database; nothing is mirrored.
    Passthrough,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Passthrough => "passthrough",
        }
    }
}
