//! The TLS stream's byte buffers: taken from a small pool of the thread's
//! when bytes arrive, given back as soon as they are empty.
//!
//! A connection holds a buffer only while it has bytes in flight (a partial
//! record, data the reader has not taken, records the socket has not taken),
//! so an idle one holds none. Pooled buffers were zero-filled once, when
//! made: taking one costs neither an allocation nor a fill, which a buffer
//! made for every read and write did (a 16 KiB call went from 195k to 276k
//! instructions in the bridge, a third of them `memset` and `memmove`).

use std::{cell::RefCell, mem};

/// Bytes in a pooled buffer: two whole TLS records of 16 KiB with room to
/// spare, so a read or a write takes two records at once and a partial
/// record left at the end is moved to the front once per two records.
pub(super) const SIZE: usize = 36 * 1024;

/// Most buffers a thread keeps: 288 KiB per thread.
const POOLED: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A pooled buffer for one direction of one connection; holds no memory
/// while empty.
#[derive(Default)]
pub(super) struct Buffer {
    buf: Vec<u8>,
    /// The bytes held are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Buffer {
    /// The bytes held.
    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The bytes held, to be worked on in place (decrypted).
    pub(super) fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops `n` bytes from the front; an emptied buffer goes back to the
    /// pool.
    pub(super) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            give(mem::take(&mut self.buf));
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for at least `min` more bytes after those held (initialized,
    /// contents unspecified); [`Buffer::filled`] says how much was used.
    pub(super) fn room(&mut self, min: usize) -> &mut [u8] {
        if self.buf.len() - self.end < min {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let need = self.end + min;
            if self.buf.is_empty() {
                self.buf = take(need);
            } else if self.buf.len() < need {
                self.buf.resize(need.max(self.buf.len() * 2), 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes of the room were filled.
    pub(super) fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Appends `data`.
    pub(super) fn extend(&mut self, data: &[u8]) {
        self.room(data.len())[..data.len()].copy_from_slice(data);
        self.filled(data.len());
    }

    /// Gives the buffer back if it holds nothing (after a read that found
    /// nothing, say).
    pub(super) fn release_if_empty(&mut self) {
        if self.is_empty() && !self.buf.is_empty() {
            give(mem::take(&mut self.buf));
            self.start = 0;
            self.end = 0;
        }
    }

    /// Bytes of memory held.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        give(mem::take(&mut self.buf));
    }
}

/// A buffer of at least `min` bytes, from the pool if it fits one.
fn take(min: usize) -> Vec<u8> {
    if min <= SIZE {
        let pooled = POOL.try_with(|pool| pool.try_borrow_mut().ok()?.pop());
        if let Ok(Some(buf)) = pooled {
            return buf;
        }
        return vec![0; SIZE];
    }
    vec![0; min]
}

/// Keeps `buf` for the next taker if it is a pool-sized buffer and the
/// pool has room; frees it otherwise.
fn give(buf: Vec<u8>) {
    if buf.len() != SIZE {
        return;
    }
    let _ = POOL.try_with(|pool| {
        if let Ok(mut pool) = pool.try_borrow_mut() {
            if pool.len() < POOLED {
                pool.push(buf);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_order_across_compaction_and_growth() {
        let mut b = Buffer::default();
        assert_eq!(b.held(), 0);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut out = Vec::new();
        // Feed in uneven steps and take in others, so that the front is
        // consumed, the rest moved down, and the buffer grown past SIZE.
        for step in data.chunks(7_001) {
            b.extend(step);
            let n = b.len() / 3;
            out.extend_from_slice(&b.data()[..n]);
            b.consume(n);
        }
        out.extend_from_slice(b.data());
        let n = b.len();
        b.consume(n);
        assert!(out == data);
        assert_eq!(b.held(), 0, "an emptied buffer holds nothing");
    }

    #[test]
    fn an_emptied_buffer_is_taken_again_without_a_new_allocation() {
        let mut b = Buffer::default();
        b.extend(b"record");
        let first = b.data().as_ptr();
        b.consume(6);
        let mut c = Buffer::default();
        c.extend(b"next");
        assert_eq!(c.data().as_ptr(), first, "the pooled buffer was reused");
    }
}
