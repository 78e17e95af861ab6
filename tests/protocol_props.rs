//! Property tests of the wire protocol (src/protocol/): every head and body
//! survives encode -> decode with both codecs, the hand-written head JSON
//! (src/protocol/json.rs) writes what serde writes and reads what serde
//! reads (in the layouts Python's and PHP's encoders produce too, and never
//! differently on damaged input), every control frame survives
//! encode -> decode, and `Hello::check` accepts exactly the hellos within the
//! limits of docs/PROTOCOL.md section 3.1. The cargo-fuzz targets in fuzz/
//! (docs/FUZZING.md) attack the same functions with hostile bytes.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use wsbridge::headers::WireText;
use wsbridge::protocol::json::{
    read_head_ref, write_head, write_request, EncodedHeaders, HeadRef, RequestFields,
};
use wsbridge::protocol::{
    decode_control, decode_data, encode_control, encode_data, encode_frame, BodyHead, Compression,
    Control, DataHead, Hello, RequestHead, ResponseHead, Resume, Welcome, COMPRESS_MIN,
    MAX_INFLIGHT, MAX_RESUME_IDS, MAX_SERVICES,
};
use wsbridge::protocol::{encode_head, encode_request_encoded, encode_response};

/// The fast head reader's answer, owned (as `decode_data` returns it).
fn read_head(json: &[u8]) -> Option<DataHead> {
    read_head_ref(json).map(HeadRef::into_owned)
}

/// Strings of any characters, control characters, quotes, backslashes and
/// astral-plane characters included (all need care in JSON).
fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..24).prop_map(String::from_iter)
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), 0..6)
}

/// Indices of Latin-1 values (the codec does not check them against the
/// headers: `headers::from_wire` does).
fn latin1() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        3 => Just(vec![]),
        2 => vec(0usize..6, 1..4),
        1 => vec(0usize..100_000, 1..4),
    ]
}

/// `headers` as the borrowing encoders take them, the values `latin1`
/// lists marked; `None` when that list is not one they can write (indices
/// in order, each naming a header).
fn marked<'a>(
    headers: &'a [(String, String)],
    latin1: &[usize],
) -> Option<Vec<(&'a str, WireText<'a>)>> {
    let writable =
        latin1.windows(2).all(|w| w[0] < w[1]) && latin1.iter().all(|&i| i < headers.len());
    writable.then(|| {
        headers
            .iter()
            .enumerate()
            .map(|(i, (n, v))| {
                let value = if latin1.contains(&i) {
                    WireText::Latin1(v.clone())
                } else {
                    WireText::from(v.as_str())
                };
                (n.as_str(), value)
            })
            .collect()
    })
}

fn data_head() -> impl Strategy<Value = DataHead> {
    prop_oneof![
        (
            any::<u64>(),
            text(),
            text(),
            text(),
            text(),
            headers(),
            latin1(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(id, request_id, service, method, path, headers, latin1, end, gate)| {
                    DataHead::Request(RequestHead {
                        id,
                        request_id,
                        service,
                        method,
                        path,
                        headers,
                        latin1,
                        end,
                        gate,
                    })
                }
            ),
        (
            any::<u64>(),
            any::<u16>(),
            headers(),
            latin1(),
            any::<bool>()
        )
            .prop_map(|(id, status, headers, latin1, end)| DataHead::Response(
                ResponseHead {
                    id,
                    status,
                    headers,
                    latin1,
                    end,
                }
            )),
        (any::<u64>(), any::<bool>()).prop_map(|(id, end)| DataHead::Body(BodyHead { id, end })),
        Just(DataHead::Unknown),
    ]
}

/// Small random bodies, and bodies past `COMPRESS_MIN` that LZ4 shrinks (a
/// short random pattern repeated) so the compressed path is taken.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..64),
        1 => (vec(any::<u8>(), 1..32), COMPRESS_MIN..2 * COMPRESS_MIN).prop_map(
            |(pattern, len)| pattern.iter().copied().cycle().take(len).collect()
        ),
        1 => vec(any::<u8>(), COMPRESS_MIN..COMPRESS_MIN + 64),
    ]
}

fn resume(session_id: impl Strategy<Value = String>) -> impl Strategy<Value = Resume> {
    (session_id, vec(any::<u64>(), 0..4), vec(any::<u64>(), 0..4)).prop_map(
        |(session_id, running, replied)| Resume {
            session_id,
            running,
            replied,
        },
    )
}

fn hello_any() -> impl Strategy<Value = Hello> {
    (
        text(),
        vec(text(), 0..4),
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        vec(text(), 0..3),
        any::<bool>(),
        proptest::option::of(resume(text())),
    )
        .prop_map(
            |(
                worker_id,
                services,
                max_inflight,
                flow_control,
                accepted,
                compression,
                resumable,
                resume,
            )| Hello {
                worker_id,
                metadata: Default::default(),
                services,
                max_inflight,
                flow_control,
                accepted,
                compression,
                resumable,
                resume,
            },
        )
}

fn control() -> impl Strategy<Value = Control> {
    let welcome = (
        any::<u32>(),
        text(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(text()),
        any::<u64>(),
        any::<bool>(),
        vec(any::<u64>(), 0..4),
    )
        .prop_map(
            |(
                version,
                session_id,
                ping_interval_ms,
                ping_misses,
                max_frame,
                max_response_body,
                window,
                compression,
                resume_window_ms,
                resumed,
                resend,
            )| {
                Control::Welcome(Welcome {
                    version,
                    session_id,
                    ping_interval_ms,
                    ping_misses,
                    max_frame,
                    max_response_body,
                    window,
                    compression,
                    resume_window_ms,
                    resumed,
                    resend,
                })
            },
        );
    prop_oneof![
        hello_any().prop_map(Control::Hello),
        welcome,
        (any::<u64>(), text()).prop_map(|(id, reason)| Control::Cancel { id, reason }),
        (proptest::option::of(any::<u64>()), text(), text())
            .prop_map(|(id, code, message)| Control::Error { id, code, message }),
        Just(Control::Drain),
        (any::<u64>(), any::<u64>()).prop_map(|(id, bytes)| Control::Credit { id, bytes }),
        any::<u64>().prop_map(|id| Control::Accepted { id }),
        any::<u64>().prop_map(|id| Control::Start { id }),
        Just(Control::Unknown),
    ]
}

/// A string of about `lo..=hi` bytes (never more than the drawn length) made
/// of 1-, 2-, 3- and 4-byte characters, so byte and character counts differ.
fn sized(lo: usize, hi: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![Just('a'), Just('é'), Just('€'), Just('😀')];
    (lo..=hi, vec(ch, hi)).prop_map(|(n, chars)| {
        let mut s = String::new();
        for c in chars {
            if s.len() + c.len_utf8() > n {
                break;
            }
            s.push(c);
        }
        s
    })
}

/// Hellos concentrated on the edges of the limits.
fn hello_edges() -> impl Strategy<Value = Hello> {
    let service = prop_oneof![3 => sized(1, 128), 1 => sized(0, 2), 1 => sized(124, 134)];
    let services = prop_oneof![
        4 => vec(service.clone(), 1..=3),
        1 => vec(service, 62..=66),
        1 => Just(Vec::new()),
    ];
    let max_inflight = prop_oneof![0..=2u32, MAX_INFLIGHT - 2..=MAX_INFLIGHT + 2, any::<u32>()];
    let worker_id = prop_oneof![sized(0, 256), sized(250, 262)];
    let resume = prop_oneof![
        2 => Just(None),
        1 => resume(sized(0, 128)).prop_map(Some),
        1 => resume(sized(124, 134)).prop_map(Some),
    ];
    (worker_id, services, max_inflight, resume).prop_map(
        |(worker_id, services, max_inflight, resume)| Hello {
            worker_id,
            metadata: Default::default(),
            services,
            max_inflight,
            flow_control: false,
            accepted: false,
            compression: Vec::new(),
            resumable: resume.is_some(),
            resume,
        },
    )
}

/// The limits of section 3.1 (and 8.5 for `resume`), written out
/// independently of `Hello::check`.
fn within_limits(h: &Hello) -> bool {
    (1..=64).contains(&h.services.len())
        && h.services.iter().all(|s| (1..=128).contains(&s.len()))
        && (1..=65_536).contains(&h.max_inflight)
        && h.worker_id.len() <= 256
        && h.resume.as_ref().is_none_or(|r| {
            r.session_id.len() <= 128 && r.running.len() + r.replied.len() <= 131_072
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn data_frames_round_trip_uncompressed(head in data_head(), body in body()) {
        let frame = encode_data(&head, &body);
        prop_assert_eq!(frame[0], 0, "no flags without compression");
        let (got_head, got_body) = decode_data(&frame, 0).expect("decodes");
        prop_assert_eq!(got_head, head);
        prop_assert_eq!(got_body, Bytes::from(body));
    }

    #[test]
    fn data_frames_round_trip_lz4(head in data_head(), body in body()) {
        let frame = encode_frame(&head, &body, Compression::Lz4);
        let compressed = frame[0] == 0x01;
        prop_assert!(!compressed || body.len() >= COMPRESS_MIN);
        // The receiver's limit may be exactly the body's length...
        let (got_head, got_body) = decode_data(&frame, body.len()).expect("decodes");
        prop_assert_eq!(&got_head, &head);
        prop_assert_eq!(&got_body[..], &body[..]);
        if compressed {
            // ...but not one byte less, and compression must have been agreed.
            prop_assert!(decode_data(&frame, body.len() - 1).is_err());
            prop_assert!(decode_data(&frame, 0).is_err());
        } else {
            prop_assert_eq!(frame, encode_data(&head, &body));
        }
    }

    #[test]
    fn control_frames_round_trip(frame in control()) {
        let text = encode_control(&frame);
        prop_assert!(!text.is_empty());
        prop_assert_eq!(decode_control(&text), Ok(frame));
    }

    #[test]
    fn hello_check_accepts_exactly_the_documented_limits(hello in hello_edges()) {
        let verdict = hello.check();
        prop_assert_eq!(verdict.is_ok(), within_limits(&hello), "{:?}", verdict);
        // What the worker sends is what the bridge checks.
        let text = encode_control(&Control::Hello(hello.clone()));
        let Ok(Control::Hello(decoded)) = decode_control(&text) else {
            return Err(TestCaseError::fail("hello did not round trip"));
        };
        prop_assert_eq!(decoded.check(), verdict);
    }

    #[test]
    fn any_hello_check_agrees_with_the_limits(hello in hello_any()) {
        prop_assert_eq!(hello.check().is_ok(), within_limits(&hello));
    }
}

/// JSON as other languages' encoders write it: ASCII only (`\uXXXX`, with
/// surrogate pairs), optionally with `/` escaped (PHP's `json_encode`) and
/// with a space after `:` and `,` (Python's `json.dumps`).
fn foreign(v: &serde_json::Value, spaced: bool, escape_slash: bool, out: &mut String) {
    use serde_json::Value;
    let (colon, comma) = if spaced { (": ", ", ") } else { (":", ",") };
    match v {
        Value::String(s) => {
            out.push('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '/' if escape_slash => out.push_str("\\/"),
                    '\n' => out.push_str("\\n"),
                    ' '..='~' => out.push(c),
                    _ => {
                        let mut units = [0u16; 2];
                        for u in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{u:04x}"));
                        }
                    }
                }
            }
            out.push('"');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                foreign(item, spaced, escape_slash, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                foreign(&Value::String(k.clone()), spaced, escape_slash, out);
                out.push_str(colon);
                foreign(item, spaced, escape_slash, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// One of several ways to damage a head's JSON.
fn damage(json: &[u8], kind: u8, at: usize, byte: u8) -> Vec<u8> {
    let mut v = json.to_vec();
    let at = at % (v.len() + 1);
    match kind % 4 {
        0 if at < v.len() => v[at] = byte,
        1 => v.insert(at, byte),
        2 if at < v.len() => {
            v.remove(at);
        }
        _ => v.truncate(at),
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hand_written_head_json_is_what_serde_writes(head in data_head()) {
        let mut ours = Vec::new();
        write_head(&head, &mut ours);
        let serde = serde_json::to_vec(&head).expect("serialises");
        prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&serde));
    }

    #[test]
    fn the_borrowing_encoders_build_what_encode_head_builds(
        head in data_head(),
        body in body(),
        lz4 in any::<bool>(),
    ) {
        let codec = if lz4 { Compression::Lz4 } else { Compression::None };
        let expected = encode_head(&head, &body, codec);
        match &head {
            DataHead::Request(r) => {
                let Some(headers) = marked(&r.headers, &r.latin1) else {
                    return Ok(());
                };
                let fields = RequestFields::from(r);
                // Headers encoded once, as a held call keeps them for retries.
                let encoded = EncodedHeaders::new(&headers);
                let once = encode_request_encoded(&fields, &encoded, &body, codec);
                prop_assert_eq!(once.as_ref().ok(), expected.as_ref().ok());
                // The borrowing writer (the bridge measures heads with it)
                // writes the head `encode_head` frames, so the frames match.
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                write_request(&fields, &headers, &mut ours);
                write_head(&head, &mut theirs);
                prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
            }
            DataHead::Response(r) => {
                let Some(headers) = marked(&r.headers, &r.latin1) else {
                    return Ok(());
                };
                let got = encode_response((r.id, r.status), &headers, r.end, &body, codec);
                prop_assert_eq!(got, expected);
            }
            DataHead::Body(_) | DataHead::Unknown => {}
        }
    }

    #[test]
    fn the_fast_reader_reads_every_layout_as_serde_does(
        head in data_head(),
        spaced in any::<bool>(),
        escape_slash in any::<bool>(),
    ) {
        let compact = serde_json::to_vec(&head).expect("serialises");
        let pretty = serde_json::to_vec_pretty(&head).expect("serialises");
        // Through a Value: the keys come out sorted, another order.
        let value = serde_json::to_value(&head).expect("serialises");
        let mut other = String::new();
        foreign(&value, spaced, escape_slash, &mut other);
        for json in [compact, pretty, other.into_bytes()] {
            let serde: DataHead = serde_json::from_slice(&json).expect("serde reads its own");
            prop_assert_eq!(&serde, &head);
            let fast = read_head(&json);
            if head == DataHead::Unknown {
                // Unknown types are left to serde.
                prop_assert_eq!(fast, None);
            } else {
                prop_assert_eq!(fast, Some(serde), "{}", String::from_utf8_lossy(&json));
            }
        }
    }

    #[test]
    fn the_fast_reader_never_disagrees_with_serde_on_damaged_input(
        head in data_head(),
        kind in any::<u8>(),
        at in any::<usize>(),
        byte in prop_oneof![Just(b'"'), Just(b'\\'), Just(b','), Just(b'0'), Just(b'}'), any::<u8>()],
    ) {
        let json = damage(&serde_json::to_vec(&head).expect("serialises"), kind, at, byte);
        if let Some(fast) = read_head(&json) {
            let serde = serde_json::from_slice::<DataHead>(&json);
            prop_assert_eq!(serde.as_ref().ok(), Some(&fast), "{}", String::from_utf8_lossy(&json));
        }
    }
}

/// The exact edges, which the random strategies hit only sometimes.
#[test]
fn hello_limits_at_the_edges() {
    let ok = Hello {
        worker_id: "w".repeat(256),
        metadata: Default::default(),
        services: vec!["é".repeat(64); MAX_SERVICES],
        max_inflight: MAX_INFLIGHT,
        flow_control: false,
        accepted: false,
        compression: Vec::new(),
        resumable: true,
        resume: Some(Resume {
            session_id: "é".repeat(64),
            running: vec![7; MAX_RESUME_IDS / 2],
            replied: vec![5; MAX_RESUME_IDS / 2],
        }),
    };
    assert_eq!(MAX_RESUME_IDS, 131_072);
    assert_eq!(ok.check(), Ok(()));
    let with = |f: &dyn Fn(&mut Hello)| {
        let mut h = ok.clone();
        f(&mut h);
        h.check()
    };
    assert_eq!(with(&|h| h.max_inflight = 1), Ok(()));
    assert_eq!(with(&|h| h.worker_id.clear()), Ok(()));
    assert_eq!(with(&|h| h.services = vec!["a".into()]), Ok(()));
    let too_many = with(&|h| h.services.push("x".into()));
    assert_eq!(too_many, Err("hello must name 1 to 64 services".into()));
    let none = with(&|h| h.services.clear());
    assert_eq!(none, Err("hello must name 1 to 64 services".into()));
    // 128 bytes is fine (64 two-byte characters); 129 bytes is not, and
    // neither is an empty name.
    let long = with(&|h| h.services[3].push('a'));
    assert_eq!(long, Err("service names must be 1 to 128 bytes".into()));
    let empty = with(&|h| h.services[0].clear());
    assert_eq!(empty, Err("service names must be 1 to 128 bytes".into()));
    let zero = with(&|h| h.max_inflight = 0);
    assert_eq!(zero, Err("max_inflight must be 1 to 65536".into()));
    let big = with(&|h| h.max_inflight = MAX_INFLIGHT + 1);
    assert_eq!(big, Err("max_inflight must be 1 to 65536".into()));
    let id = with(&|h| h.worker_id.push('é'));
    assert_eq!(id, Err("worker_id must be at most 256 bytes".into()));
    let resume = Err(format!(
        "resume must name a session id of at most 128 bytes and at most {MAX_RESUME_IDS} calls"
    ));
    let session = with(&|h| h.resume.as_mut().expect("resume").session_id.push('a'));
    assert_eq!(session, resume);
    let ids = with(&|h| h.resume.as_mut().expect("resume").replied.push(1));
    assert_eq!(ids, resume);
    assert_eq!(with(&|h| h.resume = None), Ok(()));
}
