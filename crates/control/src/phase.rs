//! The migration's control state: phase, which backend is primary, the read
//! dial, and the transitions between them. Pure data and rules; the daemon
//! persists it and the proxy reads it through an atomic swap.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Every statement goes to the old database; nothing is mirrored.
    Passthrough,
    /// The new database is being copied and kept in step; reads stay on old.
    Mirroring,
    /// Mirroring, and the read dial sends some reads to new.
    Shifting,
    /// New is the primary; the reverse stream keeps old current.
    Promoted,
    /// Old is detached: no streams, no slots.
    Finalized,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Passthrough => "passthrough",
            Phase::Mirroring => "mirroring",
            Phase::Shifting => "shifting",
            Phase::Promoted => "promoted",
            Phase::Finalized => "finalized",
        }
    }

    /// Phases in which a change stream runs from the primary to the secondary.
    pub fn streams(self) -> bool {
        matches!(self, Phase::Mirroring | Phase::Shifting | Phase::Promoted)
    }

    pub fn all() -> [Phase; 5] {
        [
            Phase::Passthrough,
            Phase::Mirroring,
            Phase::Shifting,
            Phase::Promoted,
            Phase::Finalized,
        ]
    }
}

/// One of the two configured backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Old,
    New,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Old => "old",
            Backend::New => "new",
        }
    }

    pub fn other(self) -> Backend {
        match self {
            Backend::Old => Backend::New,
            Backend::New => Backend::Old,
        }
    }
}

/// What the data path obeys. Changed only through the transition functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub phase: Phase,
    pub primary: Backend,
    /// Percentage (0–100) of eligible reads served by the new backend.
    pub read_percent: u8,
}

impl Default for ControlState {
    fn default() -> Self {
        ControlState {
            phase: Phase::Passthrough,
            primary: Backend::Old,
            read_percent: 0,
        }
    }
}

/// A transition refused: why, and what has to happen first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub reason: String,
}

fn refuse<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        reason: reason.into(),
    })
}

impl ControlState {
    /// The backend that is not primary.
    pub fn secondary(&self) -> Backend {
        self.primary.other()
    }

    /// passthrough → mirroring.
    pub fn start_mirroring(&self) -> Result<ControlState, Refusal> {
        match self.phase {
            Phase::Passthrough => Ok(ControlState {
                phase: Phase::Mirroring,
                ..*self
            }),
            Phase::Mirroring | Phase::Shifting => {
                refuse("mirroring is already running; see /v1/status for its progress")
            }
            Phase::Promoted => refuse("new is already the primary; nothing to start"),
            Phase::Finalized => refuse("the migration is finalized; old is detached"),
        }
    }

    /// Sets the read dial. Before promotion a dial above zero means
    /// `shifting`, zero means `mirroring`; after promotion the dial only
    /// says how many reads new serves (the rest go to old, kept current by
    /// the reverse stream).
    pub fn set_reads(&self, percent: u8) -> Result<ControlState, Refusal> {
        if percent > 100 {
            return refuse(format!("percent must be between 0 and 100, got {percent}"));
        }
        let phase =
            match self.phase {
                Phase::Passthrough => return refuse(
                    "reads can move to new only while it is kept in step; start mirroring first \
                     (POST /v1/mirror/start or `cutover mirror start`)",
                ),
                Phase::Finalized => {
                    return refuse("the migration is finalized; every read is served by new")
                }
                Phase::Mirroring | Phase::Shifting if percent == 0 => Phase::Mirroring,
                Phase::Mirroring | Phase::Shifting => Phase::Shifting,
                Phase::Promoted => Phase::Promoted,
            };
        Ok(ControlState {
            phase,
            read_percent: percent,
            ..*self
        })
    }

    /// The state after a successful promote: new is primary, all reads on new.
    pub fn promote(&self) -> Result<ControlState, Refusal> {
        match self.phase {
            Phase::Mirroring | Phase::Shifting => Ok(ControlState {
                phase: Phase::Promoted,
                primary: Backend::New,
                read_percent: 100,
            }),
            Phase::Passthrough => refuse(
                "new is not kept in step yet; start mirroring, wait for the copy, verify, then promote",
            ),
            Phase::Promoted => refuse("new is already the primary"),
            Phase::Finalized => refuse("the migration is finalized"),
        }
    }

    /// Rollback: before promotion, the dial goes to zero; after promotion,
    /// old becomes primary again (the caller runs the pause-and-swap).
    pub fn rollback(&self) -> Result<ControlState, Refusal> {
        match self.phase {
            Phase::Mirroring | Phase::Shifting | Phase::Promoted => Ok(ControlState {
                phase: Phase::Mirroring,
                primary: Backend::Old,
                read_percent: 0,
            }),
            Phase::Passthrough => refuse("nothing to roll back: old is primary and serves every read"),
            Phase::Finalized => refuse(
                "the migration is finalized: old no longer receives writes, so it cannot take over again",
            ),
        }
    }

    /// promoted → finalized.
    pub fn finalize(&self) -> Result<ControlState, Refusal> {
        match self.phase {
            Phase::Promoted => Ok(ControlState {
                phase: Phase::Finalized,
                primary: Backend::New,
                read_percent: 100,
            }),
            Phase::Finalized => refuse("the migration is already finalized"),
            _ => refuse(
                "finalize comes after promote: new must be the primary first (POST /v1/promote)",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_migration_is_a_valid_path() {
        let s = ControlState::default();
        let s = s.start_mirroring().unwrap();
        assert_eq!(s.phase, Phase::Mirroring);
        let s = s.set_reads(10).unwrap();
        assert_eq!((s.phase, s.read_percent), (Phase::Shifting, 10));
        let s = s.promote().unwrap();
        assert_eq!(
            (s.phase, s.primary, s.read_percent),
            (Phase::Promoted, Backend::New, 100)
        );
        let s = s.rollback().unwrap();
        assert_eq!(
            (s.phase, s.primary, s.read_percent),
            (Phase::Mirroring, Backend::Old, 0)
        );
        let s = s.promote().unwrap().finalize().unwrap();
        assert_eq!(s.phase, Phase::Finalized);
    }

    #[test]
    fn invalid_transitions_say_what_comes_first() {
        let s = ControlState::default();
        assert!(s
            .set_reads(10)
            .unwrap_err()
            .reason
            .contains("start mirroring first"));
        assert!(s.promote().unwrap_err().reason.contains("start mirroring"));
        assert!(s.finalize().unwrap_err().reason.contains("after promote"));
        assert!(s.rollback().is_err());
        let m = s.start_mirroring().unwrap();
        assert!(m
            .set_reads(101)
            .unwrap_err()
            .reason
            .contains("between 0 and 100"));
        assert!(m.start_mirroring().is_err());
        let f = m.promote().unwrap().finalize().unwrap();
        assert!(f.rollback().unwrap_err().reason.contains("finalized"));
        assert_eq!(m.set_reads(0).unwrap().phase, Phase::Mirroring);
    }

    #[test]
    fn state_round_trips_as_json() {
        let s = ControlState::default()
            .start_mirroring()
            .unwrap()
            .set_reads(25)
            .unwrap();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            r#"{"phase":"shifting","primary":"old","read_percent":25}"#
        );
        assert_eq!(serde_json::from_str::<ControlState>(&text).unwrap(), s);
    }
}
