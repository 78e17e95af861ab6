//! The replies a worker wrote lately ([`Replied`]): the call tasks record
//! each whole reply they send, so that after a dropped connection the
//! resume (`resume.rs`) can name them and send again the ones the bridge
//! never got (PROTOCOL 8.5).

use std::collections::VecDeque;

use bytes::Bytes;

/// Replies written to the current connection are kept (up to this many, and
/// [`REPLIED_BYTES`]) so that after a drop the ones that never arrived can
/// be sent again on the resumed connection.
const REPLIED_KEPT: usize = 4096;

/// Most bytes of replies kept for a resend.
const REPLIED_BYTES: usize = 16 << 20;

/// Recently written whole replies, oldest first.
#[derive(Default)]
pub(super) struct Replied {
    frames: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Replied {
    pub(super) fn push(&mut self, id: u64, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back((id, frame));
        while self.frames.len() > REPLIED_KEPT || self.bytes > REPLIED_BYTES {
            match self.frames.pop_front() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The replies kept, oldest first: the call's id and its whole frame.
    pub(super) fn iter(&self) -> impl Iterator<Item = &(u64, Bytes)> {
        self.frames.iter()
    }

    pub(super) fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}
