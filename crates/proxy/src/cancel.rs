//! Cancel keys. Clients get a key whose pid is that of the backend session
//! serving them (so `pg_backend_pid()`, `pg_terminate_backend`, NOTIFY
//! sender pids and `pg_stat_activity` agree with what the driver reports)
//! and whose secret the proxy mints; a CancelRequest carrying one is
//! forwarded to the backend session that client is pinned to, with that
//! session's real key. Unknown keys are ignored, as PostgreSQL ignores them.

use cutover_wire::messages::backend_key_data::CancelKey;
use rand::RngExt;
use std::collections::HashMap;
use std::sync::Mutex;

/// Where a cancel for a client key goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub address: String,
    pub key: CancelKey,
    /// Set when the backend runs inside cutover: the cancel goes to it
    /// directly.
    pub embedded: Option<cutover_backend::EmbeddedBackend>,
}

#[derive(Default)]
pub struct CancelRegistry {
    targets: Mutex<HashMap<CancelKey, CancelTarget>>,
}

impl CancelRegistry {
    /// Mints a fresh client key for `target`: its backend's pid, a secret
    /// of the proxy's (never the backend's).
    pub fn register(&self, target: CancelTarget) -> CancelKey {
        let mut rng = rand::rng();
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let key = CancelKey {
                pid: target.key.pid,
                secret: rng.random(),
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = targets.entry(key) {
                slot.insert(target);
                return key;
            }
        }
    }

    /// Points a client's key at its new backend session.
    pub fn update(&self, key: CancelKey, target: CancelTarget) {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, target);
    }

    pub fn forget(&self, key: CancelKey) {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    pub fn lookup(&self, key: CancelKey) -> Option<CancelTarget> {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
    }
}
