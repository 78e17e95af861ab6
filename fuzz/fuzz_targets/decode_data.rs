//! Binary (data) frames from a hostile peer: `decode_data` and `peek_id` must
//! never panic, whatever decodes must survive `encode_data` -> `decode_data`
//! unchanged, and the hand-written head reader (`json::read_head_ref`) must
//! read a head exactly as serde does whenever it reads one at all.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsbridge::protocol::{
    decode_data, encode_data, encode_frame, json, peek_id, Compression, DataHead, FrameError,
    MAX_HEADER_LEN,
};

/// Inflate limits: compression not agreed, a small receiver, the default
/// `max_frame`.
const LIMITS: [usize; 3] = [0, 64 * 1024, 1024 * 1024];

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    // The last byte picks the limit (it is also part of the frame: the
    // fuzzer learns to steer it).
    let limit = LIMITS[data.last().map_or(0, |b| *b as usize % LIMITS.len())];
    let peeked = peek_id(&frame);
    // The fast path answers only for what it fully understands, and then
    // exactly as serde would.
    if let Some(json_head) = data.get(4..) {
        for candidate in [json_head, data] {
            if let Some(fast) = json::read_head_ref(candidate).map(json::HeadRef::into_owned) {
                let slow = serde_json::from_slice::<DataHead>(candidate);
                assert_eq!(slow.ok(), Some(fast), "read_head_ref and serde disagree");
            }
        }
    }
    let Ok((head, body)) = decode_data(&frame, limit) else {
        return;
    };

    // The prefix said this much header; an uncompressed body is the rest,
    // a compressed one inflates to at most the limit.
    let word = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let len = (word & 0x00ff_ffff) as usize;
    assert!(len <= MAX_HEADER_LEN);
    if word >> 24 == 0 {
        assert_eq!(&body[..], &data[4 + len..]);
    } else {
        assert_eq!(word >> 24, 1, "only the lz4 flag may be accepted");
        assert!(limit > 0 && body.len() <= limit, "inflated past the limit");
    }
    // A head that decodes names the same id that peek_id sees -- except
    // that serde's internally tagged enums also accept a JSON *array*
    // (`["body",5,true]`), which peek_id (a struct) reads differently; the
    // bridge calls peek_id only after a failed decode, so that is harmless.
    if let (Some(id), true) = (head.id(), data.get(4) == Some(&b'{')) {
        assert_eq!(peeked, Some(id), "decoded id and peek_id disagree");
    }

    // Re-encoding what was decoded gives a frame that decodes to the same.
    let again = encode_data(&head, &body);
    let again_len =
        (u32::from_be_bytes([again[0], again[1], again[2], again[3]]) & 0x00ff_ffff) as usize;
    match decode_data(&again, 0) {
        Ok((head2, body2)) => {
            assert_eq!(head2, head);
            assert_eq!(body2, body);
        }
        // Re-serialising adds defaults (`"end":true`, `"headers":[]`), so a
        // header at the very limit can grow past it: encode_data does not
        // check (encode_head does).
        Err(FrameError::HeaderTooLarge(n)) => {
            assert!(n > MAX_HEADER_LEN && n == again_len);
            assert!(wsbridge::protocol::encode_head(&head, &body, Compression::None).is_err());
        }
        Err(e) => panic!("re-encoded frame does not decode: {e}\nhead: {head:?}"),
    }
    // And through the compressing encoder, with the receiver's limit
    // exactly the body length.
    if again_len <= MAX_HEADER_LEN {
        let lz4 = encode_frame(&head, &body, Compression::Lz4);
        let (head3, body3) = decode_data(&lz4, body.len().max(1)).expect("lz4 re-encode decodes");
        assert_eq!(head3, head);
        assert_eq!(body3, body);
    }
});
