//! The open state of one image, kept in one place and shared by the
//! generic layer and the driver: whether the image is open read-only,
//! read-write or closed, and the requests in flight.

use crate::inflight::RequestTracker;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// How an image is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Closed: every request fails.
    Closed,
    /// Open without write access.
    ReadOnly,
    /// Open for reading and writing.
    ReadWrite,
}

/// Shared open state of one image.
#[derive(Debug)]
pub struct OpenState {
    mode: AtomicU8,
    requests: RequestTracker,
}

fn encode(m: Mode) -> u8 {
    match m {
        Mode::Closed => 0,
        Mode::ReadOnly => 1,
        Mode::ReadWrite => 2,
    }
}

impl OpenState {
    /// A new state, open read-only or read-write.
    pub fn new(read_only: bool) -> Arc<Self> {
        Arc::new(OpenState {
            mode: AtomicU8::new(encode(if read_only {
                Mode::ReadOnly
            } else {
                Mode::ReadWrite
            })),
            requests: RequestTracker::new(),
        })
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Acquire) {
            0 => Mode::Closed,
            1 => Mode::ReadOnly,
            _ => Mode::ReadWrite,
        }
    }

    /// True unless the image is open read-write.
    pub fn is_read_only(&self) -> bool {
        self.mode() != Mode::ReadWrite
    }

    /// The requests in flight on this image.
    pub fn requests(&self) -> &RequestTracker {
        &self.requests
    }

    /// Sets the mode; returns the previous one.
    pub(crate) fn set(&self, m: Mode) -> Mode {
        match self.mode.swap(encode(m), Ordering::AcqRel) {
            0 => Mode::Closed,
            1 => Mode::ReadOnly,
            _ => Mode::ReadWrite,
        }
    }
}
