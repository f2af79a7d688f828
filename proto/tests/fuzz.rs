//! Fuzz harnesses (proptest, stable Rust) for the wire layer every client and the daemon share:
//! the NDJSON frame reader and the JSON-RPC envelopes and method params.
//!
//! Each harness runs a small number of cases by default (the CI smoke); `SPARK_FUZZ_CASES` and
//! `SPARK_FUZZ_SECS` scale every harness at once, which is how `bench/fuzz.sh` runs the long
//! campaign.

use std::io::BufReader;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;
use spark_proto::frame::{Frame, encode, read_frame};
use spark_proto::jsonrpc::{Message, Request, Response};
use spark_proto::methods::ClientRequest;
use spark_proto::{ErrorCode, Id};
use spark_testkit::fuzz;

/// Bytes where newlines, carriage returns and invalid UTF-8 are common.
fn wire_bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => Just(b'x'),
            3 => Just(b'\n'),
            2 => Just(b'\r'),
            1 => Just(0xFFu8),
            1 => Just(b'{'),
            2 => any::<u8>(),
        ],
        0..max_len,
    )
}

/// What a correct reader yields: each `\n`-terminated line (its bytes before the `\n`,
/// carriage return included) is a `Line` without one trailing `\r` if it fits in `max`, else
/// `TooLong` with its length; an unterminated tail is dropped at end of stream.
fn model_frames(input: &[u8], max: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut parts: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    parts.pop();
    for raw in parts {
        if raw.len() > max {
            frames.push(Frame::TooLong { len: raw.len() });
        } else {
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            frames.push(Frame::Line(line.to_vec()));
        }
    }
    frames
}

#[test]
fn fuzz_read_frame_matches_the_line_model_for_every_buffer_size() {
    fuzz(
        "proto read_frame",
        256,
        (wire_bytes(300), 0usize..40, 1usize..24),
        |(input, max, capacity)| {
            let mut reader = BufReader::with_capacity(capacity, &input[..]);
            let mut frames = Vec::new();
            loop {
                match read_frame(&mut reader, max) {
                    Ok(Frame::Eof) => break,
                    Ok(frame) => frames.push(frame),
                    Err(e) => return Err(TestCaseError::fail(format!("io error {e}"))),
                }
                prop_assert!(frames.len() <= input.len(), "more frames than bytes");
            }
            prop_assert_eq!(frames, model_frames(&input, max));
            Ok(())
        },
    );
}

/// Arbitrary JSON, with strings full of the characters framing cares about.
fn json_value() -> impl Strategy<Value = Value> {
    let string = prop_oneof![
        any::<String>(),
        "[a-z\n\r\"\\\\\u{2028}\u{0}]{0,12}",
        Just("2.0".to_owned()),
        Just("initialize".to_owned()),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        string.prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("jsonrpc".to_owned()),
                    Just("id".to_owned()),
                    Just("method".to_owned()),
                    Just("params".to_owned()),
                    Just("result".to_owned()),
                    Just("error".to_owned()),
                    Just("repo".to_owned()),
                    Just("patch".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn fuzz_encode_is_always_exactly_one_line_that_parses_back() {
    fuzz("proto encode", 256, json_value(), |value| {
        let line = encode(&value);
        prop_assert_eq!(line.last(), Some(&b'\n'));
        prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let mut reader = BufReader::new(&line[..]);
        let frame =
            read_frame(&mut reader, line.len()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let Frame::Line(bytes) = frame else {
            return Err(TestCaseError::fail(format!("not a line: {frame:?}")));
        };
        let back: Value =
            serde_json::from_slice(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Floats may lose their last bit through text; everything else is exact.
        if !line.contains(&b'.') && !line.contains(&b'e') {
            prop_assert_eq!(back, value);
        }
        Ok(())
    });
}

/// A request-shaped object: right or wrong `jsonrpc`, any id, known or unknown method, any
/// params.
fn request_like() -> impl Strategy<Value = Value> {
    let method = prop_oneof![
        prop::sample::select(ClientRequest::NAMES).prop_map(|m| Value::String(m.to_owned())),
        "[a-z/]{0,12}".prop_map(Value::String),
        json_value(),
    ];
    let version = prop_oneof![4 => Just(Value::from("2.0")), 1 => json_value()];
    (
        prop::option::of(version),
        prop::option::of(json_value()),
        prop::option::of(method),
        prop::option::of(json_value()),
    )
        .prop_map(|(version, id, method, params)| {
            let mut object = serde_json::Map::new();
            for (key, value) in [
                ("jsonrpc", version),
                ("id", id),
                ("method", method),
                ("params", params),
            ] {
                if let Some(value) = value {
                    object.insert(key.to_owned(), value);
                }
            }
            Value::Object(object)
        })
}

#[test]
fn fuzz_envelopes_and_method_params_parse_or_fail_with_the_right_code() {
    fuzz(
        "proto jsonrpc",
        256,
        prop_oneof![request_like(), json_value()],
        |value| {
            // None of these may panic, whatever the shape.
            let _ = serde_json::from_value::<Message>(value.clone());
            let _ = serde_json::from_value::<Response>(value.clone());
            let Ok(request) = serde_json::from_value::<Request>(value.clone()) else {
                return Ok(());
            };
            prop_assert!(value.is_object(), "a request read from {}", value);
            prop_assert!(matches!(
                request.id,
                Id::Number(_) | Id::String(_) | Id::Null
            ));
            match ClientRequest::parse(&request.method, request.params.clone()) {
                Ok(parsed) => prop_assert_eq!(parsed.name(), request.method.as_str()),
                Err(err) => {
                    let known = ClientRequest::NAMES.contains(&request.method.as_str());
                    let expected = if known {
                        ErrorCode::InvalidParams
                    } else {
                        ErrorCode::MethodNotFound
                    };
                    prop_assert_eq!(err.error_code(), Some(expected), "{:?}", err);
                    prop_assert!(!err.message.trim().is_empty());
                    prop_assert!(!err.message.contains('\n'), "{:?}", err.message);
                }
            }
            // A request that parsed goes back on the wire as the same request.
            let line = encode(&request);
            let again: Request = serde_json::from_slice(&line[..line.len() - 1])
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(again.method, request.method);
            prop_assert_eq!(again.id, request.id);
            Ok(())
        },
    );
}

#[test]
fn fuzz_every_method_with_arbitrary_params_never_panics() {
    fuzz(
        "proto method params",
        256,
        (
            prop::sample::select(ClientRequest::NAMES),
            prop::option::of(json_value()),
        ),
        |(method, params)| {
            match ClientRequest::parse(method, params) {
                Ok(parsed) => prop_assert_eq!(parsed.name(), method),
                Err(err) => {
                    prop_assert_eq!(err.error_code(), Some(ErrorCode::InvalidParams));
                    prop_assert!(!err.message.contains('\n'), "{:?}", err.message);
                }
            }
            Ok(())
        },
    );
}

/// A line twice the protocol's limit is reported with its length and skipped, and the next line
/// still reads (the reader keeps at most the limit of it, see `read_frame`).
#[test]
fn a_line_twice_the_limit_is_skipped_and_the_next_one_reads() {
    use std::io::Read as _;
    let len = 2 * spark_proto::MAX_LINE_BYTES;
    let input = std::io::repeat(b'x')
        .take(len as u64)
        .chain(&b"\r\n{}\n"[..]);
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let max = spark_proto::MAX_LINE_BYTES;
    assert_eq!(
        read_frame(&mut reader, max).expect("read"),
        Frame::TooLong { len: len + 1 }
    );
    assert_eq!(
        read_frame(&mut reader, max).expect("read"),
        Frame::Line(b"{}".to_vec())
    );
    assert_eq!(read_frame(&mut reader, max).expect("read"), Frame::Eof);
}

/// Found by `fuzz_envelopes_and_method_params_parse_or_fail_with_the_right_code`: serde filled a
/// request from an array, so `["2.0", 7, "status"]` was served as a status request (JSON-RPC 2.0
/// reads an array as a batch, which spark does not take), and an unknown method's name went
/// into the error message raw, newline and all.
#[test]
fn an_array_is_not_a_request_and_an_unknown_method_is_named_escaped() {
    for array in [
        serde_json::json!(["2.0", 7, "status"]),
        serde_json::json!(["2.0", 0, "\n"]),
    ] {
        assert!(
            serde_json::from_value::<Request>(array.clone()).is_err(),
            "{array}"
        );
    }
    let request: Request =
        serde_json::from_str(r#"{"jsonrpc":"2.0","id":7,"method":"status","params":null}"#)
            .expect("an object still reads");
    assert_eq!((request.id, request.params), (Id::Number(7), None));
    let err = ClientRequest::parse("a\nb\u{7}", None).expect_err("unknown");
    assert_eq!(err.message, "unknown method `a\\nb\\u{7}`");
}
