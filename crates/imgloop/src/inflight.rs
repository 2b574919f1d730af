//! Coordination of requests in flight, shared by the generic layer and
//! every driver:
//!
//! - [`RequestTracker`]: a grace-period tracker. Every request holds a
//!   [`Ticket`] from before it maps a range until its data I/O is done. A
//!   driver that stops pointing at a host range (discard, a rewrite that
//!   moved a cluster) tags the range with [`RequestTracker::tag`] and reuses
//!   it only once [`RequestTracker::is_safe`] says every request that could
//!   still have mapped it has completed. So a read never returns another
//!   guest range's bytes, and a write never lands in reused space.
//! - [`UnitLocks`]: claims on allocation units (clusters, blocks), so two
//!   requests never allocate the same unit at once; a claim is an owned
//!   guard that can travel inside a pending write until it is published.
//! - [`RangeLocks`]: byte-range locks for read-modify-write of unaligned
//!   requests: only overlapping requests wait for each other.
//!
//! The tracker works in epochs, like read-copy-update: a request enters
//! the current epoch and counts itself there. The epoch advances when no
//! request of the epoch before the current one is left, so a range tagged
//! in epoch `e` is safe once the epoch reached `e + 2`. Entering and
//! leaving cost one atomic add each; nothing ever waits.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Counts requests in flight per epoch; see the module documentation.
#[derive(Debug, Default)]
pub struct RequestTracker {
    epoch: AtomicU64,
    active: [AtomicUsize; 2],
}

/// Membership of one request in a [`RequestTracker`] epoch; leaving is
/// dropping it.
#[derive(Debug)]
#[must_use = "a ticket protects a request only while it is held"]
pub struct Ticket<'a> {
    tracker: &'a RequestTracker,
    epoch: u64,
}

impl RequestTracker {
    /// A tracker with no request in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters the current epoch for the duration of one request.
    pub fn enter(&self) -> Ticket<'_> {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            self.active[(e & 1) as usize].fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == e {
                return Ticket {
                    tracker: self,
                    epoch: e,
                };
            }
            // The epoch moved between the load and the count: count again
            // in the new one.
            self.active[(e & 1) as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The tag for a host range that no mapping points at any more (call
    /// after the metadata change that unmapped it is visible to readers).
    pub fn tag(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Moves to the next epoch if no request of the previous one is left.
    fn try_advance(&self) -> bool {
        let e = self.epoch.load(Ordering::SeqCst);
        // Requests of epoch e-1 count in the slot epoch e+1 will use.
        if self.active[((e + 1) & 1) as usize].load(Ordering::SeqCst) != 0 {
            return false;
        }
        self.epoch
            .compare_exchange(e, e + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// True when every request that was in flight when `tag` was taken
    /// has completed, so the tagged range may be reused. Never waits: it
    /// advances the epoch as far as the requests in flight allow.
    pub fn is_safe(&self, tag: u64) -> bool {
        for _ in 0..2 {
            if self.epoch.load(Ordering::SeqCst) >= tag + 2 {
                return true;
            }
            if !self.try_advance() {
                break;
            }
        }
        self.epoch.load(Ordering::SeqCst) >= tag + 2
    }

    /// Requests in flight (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        self.active[0].load(Ordering::SeqCst) + self.active[1].load(Ordering::SeqCst)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.tracker.active[(self.epoch & 1) as usize].fetch_sub(1, Ordering::SeqCst);
    }
}

/// Exclusive claims on allocation units, identified by unit index.
#[derive(Debug, Default)]
pub struct UnitLocks {
    held: Mutex<HashSet<u64>>,
    released: Condvar,
}

/// A claim on one allocation unit; released when dropped.
#[derive(Debug)]
pub struct UnitGuard {
    locks: Arc<UnitLocks>,
    unit: u64,
}

impl UnitGuard {
    /// The claimed unit.
    pub fn unit(&self) -> u64 {
        self.unit
    }
}

impl UnitLocks {
    /// A new, empty claim table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Waits until no one else claims `unit`, then claims it.
    pub fn lock(self: &Arc<Self>, unit: u64) -> UnitGuard {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.contains(&unit) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.insert(unit);
        UnitGuard {
            locks: self.clone(),
            unit,
        }
    }

    /// Claims `unit` only if no one else holds it.
    pub fn try_lock(self: &Arc<Self>, unit: u64) -> Option<UnitGuard> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(unit).then(|| UnitGuard {
            locks: self.clone(),
            unit,
        })
    }
}

impl Drop for UnitGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.unit);
        self.locks.released.notify_all();
    }
}

/// Byte-range locks: exclusive holders exclude every overlapping holder,
/// shared holders exclude only overlapping exclusive ones.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, bool, u64)>>,
    next_id: AtomicU64,
    released: Condvar,
}

/// A held range; released when dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// No range held.
    pub fn new() -> Self {
        Self::default()
    }

    fn conflicts(held: &[(u64, u64, bool, u64)], start: u64, end: u64, exclusive: bool) -> bool {
        held.iter()
            .any(|&(s, e, x, _)| s < end && start < e && (x || exclusive))
    }

    fn grant(
        &self,
        held: &mut Vec<(u64, u64, bool, u64)>,
        start: u64,
        end: u64,
        exclusive: bool,
    ) -> RangeGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        held.push((start, end, exclusive, id));
        RangeGuard { locks: self, id }
    }

    /// Waits until `[start, end)` can be held, then holds it.
    pub fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while Self::conflicts(&held, start, end, exclusive) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        self.grant(&mut held, start, end, exclusive)
    }

    /// Holds `[start, end)` only if that needs no waiting.
    pub fn try_lock(&self, start: u64, end: u64, exclusive: bool) -> Option<RangeGuard<'_>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        (!Self::conflicts(&held, start, end, exclusive))
            .then(|| self.grant(&mut held, start, end, exclusive))
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|&(_, _, _, id)| id != self.id);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_safe_only_after_every_older_request_left() {
        let t = RequestTracker::new();
        let old = t.enter();
        let tag = t.tag();
        assert!(
            !t.is_safe(tag),
            "a request from before the tag is in flight"
        );
        // Requests that start later do not hold the tag back forever.
        let newer = t.enter();
        drop(old);
        drop(newer);
        assert!(t.is_safe(tag));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_request_entered_after_the_tag_does_not_block_it_once_old_ones_left() {
        let t = RequestTracker::new();
        let tag = t.tag();
        // Nothing in flight at tag time: the tag is safe at once.
        assert!(t.is_safe(tag));
        let tag2 = t.tag();
        let late = t.enter();
        // `late` entered in the epoch of tag2 and might have mapped the
        // range before it was unmapped: tag2 waits for it.
        assert!(!t.is_safe(tag2));
        drop(late);
        assert!(t.is_safe(tag2));
    }

    #[test]
    fn unit_claims_exclude_each_other_and_are_released_on_drop() {
        let locks = UnitLocks::new();
        let a = locks.lock(7);
        assert!(locks.try_lock(7).is_none());
        let b = locks.try_lock(8).expect("another unit is free");
        assert_eq!((a.unit(), b.unit()), (7, 8));
        drop(a);
        assert!(locks.try_lock(7).is_some());
    }

    #[test]
    fn only_overlapping_ranges_exclude_each_other() {
        let r = RangeLocks::new();
        let a = r.lock(0, 4096, true);
        // Next to it, exclusive or shared: no wait.
        let b = r.try_lock(4096, 8192, true).expect("adjacent range");
        assert!(r.try_lock(4000, 4100, false).is_none(), "overlaps both");
        drop(a);
        let s1 = r.try_lock(0, 4096, false).expect("shared");
        let s2 = r.try_lock(100, 200, false).expect("shared with shared");
        assert!(r.try_lock(0, 10, true).is_none());
        drop((s1, s2, b));
        assert!(r.try_lock(0, 8192, true).is_some());
    }
}
