//! What the data path obeys besides the bytes: the control state (phase,
//! primary, read dial) behind an atomic swap, the write gate that promote
//! and rollback close, and the commit fence that holds a commit until the
//! secondary has applied it.

use arc_swap::ArcSwap;
use cutover_control::{Backend, ControlState, TrafficMetrics};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The running change stream as the data path sees it (implemented by the
/// daemon over the stream it runs).
pub trait CommitFence: Send + Sync {
    /// The primary's WAL position now: at or after every commit already
    /// acknowledged to anyone.
    fn primary_position(&self) -> BoxFuture<'_, Result<u64, String>>;
    /// Everything at or before this position is on the secondary.
    fn caught_up(&self) -> u64;
    /// Every table is copied and the stream runs; false from the moment
    /// it stops, so reads never go to a secondary that may miss rows.
    fn serving(&self) -> bool;
    /// Waits until the secondary holds everything up to `lsn`; false on timeout.
    fn wait_applied(&self, lsn: u64, timeout: Duration) -> BoxFuture<'_, bool>;
}

/// One consistent view of the control state, swapped as a whole.
pub struct Plane {
    pub state: ControlState,
    /// `mirror.sync`: commits wait for the secondary.
    pub sync: bool,
    pub sync_timeout: Duration,
    /// The stream from the primary to the secondary, when one runs.
    pub fence: Option<Arc<dyn CommitFence>>,
}

impl Plane {
    /// Statements are classified (for the dial and for commit waits) only
    /// while a stream runs; otherwise every byte just goes to the primary.
    pub fn classifies(&self) -> bool {
        self.fence.is_some()
    }
}

/// Shared by every session: the plane, the gate, the secondary's condition.
pub struct Traffic {
    plane: ArcSwap<Plane>,
    pub gate: Gate,
    /// A commit timed out waiting for the secondary at this position; reads
    /// avoid the secondary until it has caught up past it.
    lagging_until: AtomicU64,
    secondary_healthy: AtomicBool,
    pub metrics: TrafficMetrics,
    pub shadow: Arc<crate::shadow::Shadow>,
}

impl Traffic {
    pub fn new(plane: Plane, metrics: TrafficMetrics) -> Traffic {
        Traffic {
            plane: ArcSwap::from_pointee(plane),
            gate: Gate::default(),
            lagging_until: AtomicU64::new(0),
            secondary_healthy: AtomicBool::new(true),
            metrics,
            shadow: Arc::new(crate::shadow::Shadow::new(0, 4)),
        }
    }

    pub fn plane(&self) -> arc_swap::Guard<Arc<Plane>> {
        self.plane.load()
    }

    pub fn set_plane(&self, plane: Plane) {
        self.lagging_until.store(0, Ordering::SeqCst);
        self.metrics.secondary_lagging.set(0);
        self.plane.store(Arc::new(plane));
    }

    pub fn set_secondary_healthy(&self, healthy: bool) {
        self.secondary_healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn secondary_healthy(&self) -> bool {
        self.secondary_healthy.load(Ordering::Relaxed)
    }

    pub fn mark_lagging(&self, lsn: u64) {
        self.lagging_until.fetch_max(lsn, Ordering::SeqCst);
        self.metrics.secondary_lagging.set(1);
    }

    /// True while the secondary has not caught up past a commit that timed out.
    pub fn lagging(&self, fence: &dyn CommitFence) -> bool {
        let until = self.lagging_until.load(Ordering::SeqCst);
        if until == 0 {
            return false;
        }
        if fence.caught_up() >= until {
            let _ =
                self.lagging_until
                    .compare_exchange(until, 0, Ordering::SeqCst, Ordering::SeqCst);
            self.metrics.secondary_lagging.set(0);
            return false;
        }
        true
    }

    /// Holds a commit until the secondary applied it (sync mode), and
    /// returns the position the session's next secondary read needs.
    /// Availability first: on timeout, or while the secondary is known to
    /// lag, the commit is acknowledged anyway.
    pub async fn fence_commit(&self, plane: &Plane) -> Option<u64> {
        let fence = plane.fence.as_ref()?;
        let started = Instant::now();
        let lsn = tokio::time::timeout(plane.sync_timeout, fence.primary_position())
            .await
            .ok()?
            .ok()?;
        // Not serving (copying, reconnecting, failed): reads stay on the
        // primary, so nothing needs the commit on the secondary yet; the
        // returned position still fences this session's reads later.
        if !plane.sync || !fence.serving() || self.lagging(fence.as_ref()) {
            return Some(lsn);
        }
        if fence.wait_applied(lsn, plane.sync_timeout).await {
            self.metrics
                .commit_wait_seconds
                .observe(started.elapsed().as_secs_f64());
        } else {
            self.metrics.commit_wait_timeouts.inc();
            self.mark_lagging(lsn);
            tracing::warn!(
                lsn,
                timeout = ?plane.sync_timeout,
                "the secondary did not apply a commit in time; acknowledged anyway, reads leave it until it catches up"
            );
        }
        Some(lsn)
    }

    /// Which backend an eligible read goes to under the dial.
    pub fn pick(&self, state: &ControlState, draw: u64) -> Backend {
        if draw % 100 < u64::from(state.read_percent) {
            Backend::New
        } else {
            Backend::Old
        }
    }
}

/// Promote and rollback close the gate: sessions that are idle wait before
/// starting their next statement; sessions inside a transaction (or with
/// replies outstanding) finish. `wait_idle` tells when none are left.
#[derive(Default)]
pub struct Gate {
    paused: AtomicBool,
    active: AtomicI64,
    changed: Notify,
}

impl Gate {
    /// Waits until the gate is open, then counts the caller as active.
    pub async fn enter(&self) {
        loop {
            // The open gate costs two atomic operations; only a closed one
            // registers for a wake-up.
            if !self.paused.load(Ordering::SeqCst) {
                self.active.fetch_add(1, Ordering::SeqCst);
                if !self.paused.load(Ordering::SeqCst) {
                    return;
                }
                self.leave();
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.paused.load(Ordering::SeqCst) {
                changed.await;
            }
        }
    }

    /// Only a paused gate has anyone to wake: `wait_idle` runs, and
    /// `enter` waits, only while paused (and `resume` wakes them).
    pub fn leave(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        if self.paused.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn active(&self) -> i64 {
        self.active.load(Ordering::SeqCst)
    }

    /// Waits until no session is active; false at the deadline.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.active() <= 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                return self.active() <= 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_paused_gate_holds_new_work_until_resumed() {
        let gate = Arc::new(Gate::default());
        gate.enter().await;
        gate.pause();
        let g = gate.clone();
        let waiter = tokio::spawn(async move {
            g.enter().await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        assert!(
            !gate
                .wait_idle(Instant::now() + Duration::from_millis(20))
                .await
        );
        gate.leave();
        assert!(
            gate.wait_idle(Instant::now() + Duration::from_millis(200))
                .await
        );
        gate.resume();
        waiter.await.unwrap();
        assert_eq!(gate.active(), 1);
    }
}
