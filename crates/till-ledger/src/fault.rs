//! Fault injection for the embedded backend's writer: freeze/stall it, fail its commits,
//! fail receipt signing. The state always exists (a few atomics and a mutex the writer
//! touches once per batch); the handle that changes it, [`FaultInjector`], is only public
//! with the `fault-injection` cargo feature, which only dev-dependencies enable.

use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "fault-injection")]
use std::sync::Arc;
use std::sync::{Condvar, Mutex};
#[cfg(feature = "fault-injection")]
use std::time::Duration;
use std::time::Instant;

#[derive(Debug, Default)]
struct Gate {
    frozen: bool,
    stall_until: Option<Instant>,
    released: bool,
}

/// Shared fault state between the ledger handle and its writer thread.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    gate: Mutex<Gate>,
    changed: Condvar,
    fail_commits: AtomicBool,
    fail_signing: AtomicBool,
}

impl Faults {
    /// Blocks the writer while frozen or stalled (before it starts a batch).
    pub(crate) fn wait_until_runnable(&self) {
        let Ok(mut gate) = self.gate.lock() else {
            return;
        };
        loop {
            if gate.released {
                return;
            }
            if gate.frozen {
                gate = match self.changed.wait(gate) {
                    Ok(g) => g,
                    Err(_) => return,
                };
                continue;
            }
            match gate.stall_until {
                Some(until) if until > Instant::now() => {
                    let left = until.saturating_duration_since(Instant::now());
                    gate = match self.changed.wait_timeout(gate, left) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
                _ => return,
            }
        }
    }

    /// Lets the writer run for good (the ledger is being dropped).
    pub(crate) fn release(&self) {
        if let Ok(mut gate) = self.gate.lock() {
            gate.released = true;
        }
        self.changed.notify_all();
    }

    pub(crate) fn commit_should_fail(&self) -> bool {
        self.fail_commits.load(Ordering::SeqCst)
    }

    pub(crate) fn signing_should_fail(&self) -> bool {
        self.fail_signing.load(Ordering::SeqCst)
    }

    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fn update(&self, f: impl FnOnce(&mut Gate)) {
        if let Ok(mut gate) = self.gate.lock() {
            f(&mut gate);
        }
        self.changed.notify_all();
    }
}

/// Test handle on an [`crate::EmbeddedLedger`]'s writer (feature `fault-injection`).
///
/// Freezing or stalling takes effect before the writer's next batch: a batch already
/// being applied completes. While frozen, claims time out with
/// [`crate::LedgerError::Unavailable`]; claims whose callers timed out before the writer
/// got to them are skipped when it resumes, so they write nothing.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone)]
pub struct FaultInjector {
    faults: Arc<Faults>,
}

#[cfg(feature = "fault-injection")]
impl FaultInjector {
    pub(crate) fn new(faults: Arc<Faults>) -> Self {
        Self { faults }
    }

    /// Stops the writer before its next batch until [`FaultInjector::unfreeze`].
    pub fn freeze(&self) {
        self.faults.update(|g| g.frozen = true);
    }

    /// Lets a frozen writer continue.
    pub fn unfreeze(&self) {
        self.faults.update(|g| g.frozen = false);
    }

    /// Makes the writer sleep for `duration` before its next batch (from now).
    pub fn stall_for(&self, duration: Duration) {
        self.faults
            .update(|g| g.stall_until = Some(Instant::now() + duration));
    }

    /// While on, every batch that would write is aborted instead of committed: every
    /// claim in it gets [`crate::LedgerError::Unavailable`] and nothing is stored.
    pub fn fail_commits(&self, on: bool) {
        self.faults.fail_commits.store(on, Ordering::SeqCst);
    }

    /// While on, receipt signing fails: the claim gets [`crate::LedgerError::Signing`]
    /// and writes nothing.
    pub fn fail_signing(&self, on: bool) {
        self.faults.fail_signing.store(on, Ordering::SeqCst);
    }

    /// Clears every injected fault.
    pub fn reset(&self) {
        self.fail_commits(false);
        self.fail_signing(false);
        self.faults.update(|g| {
            g.frozen = false;
            g.stall_until = None;
        });
    }
}
