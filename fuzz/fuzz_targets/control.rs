//! Text (control) frames, the handshake's `hello` first of all: `decode_control`
//! must never panic, `Hello::check` must accept exactly the hellos within the
//! limits of docs/PROTOCOL.md section 3.1, and every decoded frame must survive
//! `encode_control` -> `decode_control` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbridge::protocol::{decode_control, encode_control, Control, Hello, MAX_INFLIGHT};

/// The documented limits (sections 3.1 and 8.5), written out independently
/// of `Hello::check`.
fn within_limits(h: &Hello) -> bool {
    (1..=64).contains(&h.services.len())
        && h.services.iter().all(|s| (1..=128).contains(&s.len()))
        && (1..=65_536).contains(&h.max_inflight)
        && h.worker_id.len() <= 256
        && h.resume.as_ref().is_none_or(|r| {
            r.session_id.len() <= 128 && r.running.len() + r.replied.len() <= 131_072
        })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = decode_control(text) else {
        return;
    };
    if let Control::Hello(h) = &frame {
        assert_eq!(MAX_INFLIGHT, 65_536);
        let verdict = h.check();
        assert_eq!(verdict.is_ok(), within_limits(h), "{h:?}: {verdict:?}");
        if let Err(message) = verdict {
            // The message goes back in a `bad_hello` error frame.
            let error = Control::Error {
                id: None,
                code: "bad_hello".into(),
                message,
            };
            assert_eq!(decode_control(&encode_control(&error)), Ok(error));
        }
    }
    let text2 = encode_control(&frame);
    assert!(!text2.is_empty(), "encode_control failed for {frame:?}");
    match decode_control(&text2) {
        Ok(again) => assert_eq!(again, frame, "{text2}"),
        Err(e) => panic!("re-encoded control frame does not decode: {e}\n{text2}"),
    }
});
