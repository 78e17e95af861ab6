//! LZ4 bodies (docs/PROTOCOL.md section 7.7).
//!
//! 1. Any body sent with `encode_frame(.., Compression::Lz4)` decodes back to
//!    exactly itself when the receiver's limit is its length, and is refused
//!    (not truncated) one byte below it when it was compressed.
//! 2. Any bytes behind a prefix with the 0x01 flag, i.e. a hostile compressed
//!    body, must never panic, never inflate past the limit, and never make the
//!    decoder allocate more than the limit (checked by a counting allocator).
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsbridge::protocol::{
    decode_data, encode_frame, BodyHead, Compression, DataHead, FrameError, COMPRESS_MIN,
};

/// Records the largest single allocation made while `ARMED`.
struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations the decoder may make besides the body: the parsed head and
/// error messages.
const SLACK: usize = 4096;

/// Limits for hostile bodies: not agreed, tiny, a small receiver, the
/// default `max_frame`.
const LIMITS: [usize; 4] = [0, 255, 64 * 1024, 1024 * 1024];

const HEAD: &[u8] = br#"{"type":"body","id":5,"end":false}"#;

fn head() -> DataHead {
    DataHead::Body(BodyHead { id: 5, end: false })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };

    // 1. Round trip. Bodies under COMPRESS_MIN are never compressed, so a
    // short input is also stretched (cycled) past it: the fuzzer's inputs
    // stay small and fast while the compressor still sees them.
    round_trip(rest);
    if !rest.is_empty() && rest.len() < COMPRESS_MIN {
        let len = COMPRESS_MIN + selector as usize * 61;
        let stretched: Vec<u8> = rest.iter().copied().cycle().take(len).collect();
        round_trip(&stretched);
    }

    // 2. The same bytes as a hostile compressed body.
    let limit = LIMITS[selector as usize % LIMITS.len()];
    let mut frame = Vec::with_capacity(4 + HEAD.len() + rest.len());
    frame.extend_from_slice(&(0x0100_0000 | HEAD.len() as u32).to_be_bytes());
    frame.extend_from_slice(HEAD);
    frame.extend_from_slice(rest);
    let frame = Bytes::from(frame);
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let result = decode_data(&frame, limit);
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= limit.max(SLACK),
        "allocated {largest} bytes with an inflate limit of {limit}"
    );
    match result {
        Ok((h, body)) => {
            assert_eq!(h, head());
            assert!(limit > 0 && body.len() <= limit);
            // What inflated is what the size field announced.
            let announced = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            assert_eq!(body.len(), announced);
        }
        Err(FrameError::Compressed(_)) => {}
        Err(e) => panic!("unexpected error for a compressed body: {e}"),
    }
});

fn round_trip(body: &[u8]) {
    let frame = encode_frame(&head(), body, Compression::Lz4);
    let compressed = frame[0] == 0x01;
    if compressed {
        assert!(body.len() >= COMPRESS_MIN);
        // Compressed only when that saves at least an eighth.
        assert!(frame.len() - 4 - HEAD.len() <= body.len() - body.len() / 8);
    } else {
        assert_eq!(frame[0], 0);
        assert_eq!(&frame[4 + HEAD.len()..], body);
    }
    let (h, got) = decode_data(&frame, body.len()).expect("own frame decodes");
    assert_eq!(h, head());
    assert_eq!(&got[..], body);
    if compressed {
        assert!(
            matches!(
                decode_data(&frame, body.len() - 1),
                Err(FrameError::Compressed(_))
            ),
            "a body one byte over the limit must be refused"
        );
    }
}
