//! The migration phase. `passthrough` and `mirroring` exist so far; the read
//! dial, promote and rollback add the rest.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Every statement goes to the old database; nothing is mirrored.
    Passthrough,
    /// The new database is being copied and kept in step; reads stay on old.
    Mirroring,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Passthrough => "passthrough",
            Phase::Mirroring => "mirroring",
        }
    }
}
