//! Fuzzing the input surface (issue 3): arbitrary input never panics, never yields a 5xx,
//! and every refusal names a field.
//!
//! Two layers. Property tests run the pure parsers (push body, create body, task id,
//! WebSocket client message) on arbitrary bytes, arbitrary JSON and JSON objects built from
//! the real field names with values of every type, and compare each verdict with the rules
//! the README states. Then the same generators drive the real server on both stores: a few
//! hundred raw bodies POSTed to `/api/tasks`, `/api/tasks/{id}/progress` (checked against a
//! model of the task), and a few hundred messages on one WebSocket.
//!
//! The server-side cases come from a fixed seed, so a failure reproduces; set
//! `TASKCAST_FUZZ_SEED=<u64>` to explore other cases.

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Map, Value};
use taskcast::config::Limits;
use taskcast::domain::{MAX_STAGE_CHARS, NewTask, ProgressUpdate, TaskId};
use taskcast::error::Error;
use taskcast::ws::protocol::{self, ClientMessage};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::both_stores;
use crate::helpers::{KEY, StoreKind, TestApp, spawn_app, spawn_app_with};

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

/// Every field name a client may send anywhere: push, create, WebSocket.
const FIELDS: [&str; 9] = [
    "progress", "stage", "status", "seq", "prompt", "user_id", "type", "task_id", "token",
];

/// Keys that are almost, but not quite, field names.
const NEAR_MISS_KEYS: [&str; 10] = [
    "Progress",
    "PROGRESS",
    "progress ",
    "stage\u{0}",
    "",
    "colour",
    "taskId",
    "task-id",
    "seq\u{301}",
    "statuses",
];

const STATUSES: [&str; 5] = ["pending", "processing", "completed", "failed", "cancelled"];

/// Words a client might plausibly send as a status or a message type, right and wrong.
const WORDS: [&str; 19] = [
    "pending",
    "processing",
    "completed",
    "failed",
    "cancelled",
    "Completed",
    "COMPLETED",
    " pending",
    "done",
    "canceled",
    "subscribe",
    "unsubscribe",
    "Subscribe",
    "subscribe ",
    "unsubscribe\u{0}",
    "null",
    "true",
    "100",
    "",
];

/// Number literals as text: out of range for f64, not JSON at all, or only approximately
/// representable.
const NUMBER_LITERALS: [&str; 28] = [
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "-0.0",
    "0e0",
    "1E2",
    "1.0e+2",
    "100.00000000000001",
    "100.0000000000001",
    "99.999999999999999999999",
    "4.9e-324",
    "2.2250738585072014e-308",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "NaN",
    "Infinity",
    "-Infinity",
    "0x10",
    "01",
    "+1",
    ".5",
    "5.",
    "1e",
    "--1",
];

/// Bytes that are not UTF-8: a stray continuation byte, a truncated sequence, an encoded
/// surrogate, an overlong NUL, a code point past U+10FFFF, bytes UTF-8 never uses.
const BAD_UTF8: [&[u8]; 6] = [
    &[0xff],
    &[0xc3],
    &[0xed, 0xa0, 0x80],
    &[0xc0, 0x80],
    &[0xf4, 0x90, 0x80, 0x80],
    &[0xfe, 0xfe],
];

/// Numbers at and around every boundary the parsers care about.
fn edge_numbers() -> Vec<Value> {
    let below_100 = f64::from_bits(100f64.to_bits() - 1);
    let above_100 = f64::from_bits(100f64.to_bits() + 1);
    vec![
        Value::from(0),
        Value::from(100),
        Value::from(-1),
        Value::from(101),
        Value::from(0.0),
        Value::from(-0.0),
        Value::from(100.0),
        Value::from(below_100),
        Value::from(above_100),
        Value::from(100.0000001),
        Value::from(-0.0000001),
        Value::from(0.1 + 0.2),
        Value::from(100.0 / 3.0),
        Value::from(1e308),
        Value::from(-1e308),
        Value::from(f64::MAX),
        Value::from(f64::MIN_POSITIVE),
        Value::from(5e-324),
        Value::from(f64::EPSILON),
        Value::from(u64::MAX),
        Value::from(i64::MAX),
        Value::from(i64::MAX as u64 + 1),
        Value::from(i64::MIN),
        Value::from(u32::MAX),
    ]
}

/// A JSON number: mostly edge cases and values near 0..=100, some anywhere.
fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => select(edge_numbers()),
        3 => (-10.0f64..=110.0).prop_map(Value::from),
        2 => (0u64..=100).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        // NaN and the infinities become null: JSON has no such numbers.
        1 => any::<f64>().prop_map(Value::from),
    ]
    .boxed()
}

/// A UUID-ish string: canonical, uppercase, padded, in another UUID form, with one
/// character replaced, or cut short.
fn uuid_like() -> BoxedStrategy<String> {
    (any::<u128>(), 0u8..10, any::<Index>(), any::<char>())
        .prop_map(|(bits, how, at, c)| {
            let id = Uuid::from_u128(bits);
            let canonical = id.hyphenated().to_string();
            match how {
                0..=2 => canonical,
                3 => canonical.to_uppercase(),
                4 => format!(" {canonical}\t\n"),
                5 => id.simple().to_string(),
                6 => id.braced().to_string(),
                7 => id.urn().to_string(),
                8 => {
                    let mut chars: Vec<char> = canonical.chars().collect();
                    let i = at.index(chars.len());
                    chars[i] = c;
                    chars.into_iter().collect()
                }
                _ => canonical[..at.index(canonical.len())].to_string(),
            }
        })
        .boxed()
}

/// A string: known words, arbitrary Unicode, control characters, lengths around the stage
/// limit (in characters that take 1 to 4 bytes, and combining marks), UUIDs, and runs of up
/// to `max_len` characters.
fn text(max_len: usize) -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(WORDS.to_vec()).prop_map(String::from),
        3 => any::<String>(),
        3 => prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        2 => "[a-z \\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{2028}\\u{feff}\\u{fffd}é😀]{0,16}",
        2 => (
            select(vec!["a", "é", "😀", "e\u{301}", "\u{200b}", "x"]),
            (MAX_STAGE_CHARS - 6)..=(MAX_STAGE_CHARS + 4),
        )
            .prop_map(|(unit, n)| unit.repeat(n)),
        1 => (0..=max_len).prop_map(|n| "x".repeat(n)),
        2 => uuid_like(),
    ]
    .boxed()
}

/// A key: mostly a real field name.
fn key() -> BoxedStrategy<String> {
    prop_oneof![
        8 => select(FIELDS.to_vec()).prop_map(String::from),
        1 => select(NEAR_MISS_KEYS.to_vec()).prop_map(String::from),
        1 => any::<String>(),
    ]
    .boxed()
}

fn json_leaf(max_len: usize) -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => number(),
        3 => text(max_len).prop_map(Value::String),
    ]
    .boxed()
}

/// Any JSON value, nested at most three levels deep.
fn json_value(max_len: usize) -> BoxedStrategy<Value> {
    json_leaf(max_len)
        .prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..5)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A value that fits the key most of the time, and anything at all otherwise.
fn value_for(key: &str, max_len: usize) -> BoxedStrategy<Value> {
    let fitting = match key {
        "progress" | "seq" => number(),
        "stage" | "prompt" | "token" => text(max_len).prop_map(Value::String).boxed(),
        "status" | "type" => select(WORDS.to_vec()).prop_map(Value::from).boxed(),
        "task_id" | "user_id" => uuid_like().prop_map(Value::String).boxed(),
        _ => json_leaf(max_len),
    };
    prop_oneof![4 => fitting, 1 => json_value(max_len)].boxed()
}

/// One `"key": value` pair, the value as JSON text; a few values are raw number literals
/// that serde_json cannot hold exactly, or at all.
fn entry(max_len: usize) -> BoxedStrategy<(String, String)> {
    prop_oneof![
        6 => key().prop_flat_map(move |k| {
            let value = value_for(&k, max_len);
            (Just(k), value.prop_map(|v| v.to_string()))
        }),
        1 => (key(), select(NUMBER_LITERALS.to_vec())).prop_map(|(k, lit)| (k, lit.to_string())),
    ]
    .boxed()
}

/// Writes an object as text, so keys may repeat.
fn object_text(entries: &[(String, String)]) -> String {
    let fields: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// A JSON object (as text) with up to five entries, keys mostly real field names.
fn object(max_len: usize) -> BoxedStrategy<String> {
    prop::collection::vec(entry(max_len), 0..6)
        .prop_map(|entries| object_text(&entries))
        .boxed()
}

/// A push a real generator might send: only push fields, mostly sensible values, and
/// statuses weighted towards the non-final ones so that pushes keep being applied.
fn plausible_push() -> BoxedStrategy<String> {
    let progress = prop_oneof![
        3 => (0.0f64..=100.0).prop_map(Value::from),
        2 => (0u64..=100).prop_map(Value::from),
        1 => select(edge_numbers()),
    ];
    let status = select(vec![
        "pending",
        "processing",
        "processing",
        "processing",
        "completed",
        "failed",
        "cancelled",
        "done",
    ]);
    let seq =
        prop_oneof![4 => 0u64..64, 1 => Just(i64::MAX as u64), 1 => Just(i64::MAX as u64 + 1)];
    (
        prop::option::of(progress),
        prop::option::of(prop_oneof![
            4 => "[a-z ]{0,24}",
            2 => any::<String>(),
            1 => text(300),
        ]),
        prop::option::weighted(0.4, status),
        prop::option::weighted(0.3, seq),
    )
        .prop_map(|(progress, stage, status, seq)| {
            let mut fields = Map::new();
            if let Some(p) = progress {
                fields.insert("progress".into(), p);
            }
            if let Some(s) = stage {
                fields.insert("stage".into(), s.into());
            }
            if let Some(s) = status {
                fields.insert("status".into(), s.into());
            }
            if let Some(n) = seq {
                fields.insert("seq".into(), n.into());
            }
            if fields.is_empty() {
                fields.insert("progress".into(), 50.into());
            }
            Value::Object(fields).to_string()
        })
        .boxed()
}

/// Odd bodies: empty, whitespace, not objects, a BOM, trailing bytes, two documents,
/// single quotes, escaped lone surrogates and control characters, and nesting far past
/// serde_json's recursion limit.
fn odd_bodies() -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = [
        "",
        " ",
        "\u{c}",
        "null",
        "[]",
        "{}",
        "\"progress\"",
        "42",
        "\u{feff}{\"progress\":1}",
        "{\"progress\":1}\u{0}",
        "{\"progress\":1} {\"progress\":2}",
        "{\"progress\":1,}",
        "{'progress':1}",
        "{\"progress\":1",
        "{\"progress\":null,\"stage\":null,\"status\":null}",
        "{\"stage\":\"\\ud800\"}",
        "{\"stage\":\"\\udc00\\ud800\"}",
        "{\"stage\":\"\\u0000\"}",
        "{\"stage\":\"\\u0085\"}",
        "{\"stage\":\"a\\u2028b\"}",
        "{\"colour\":null,\"progress\":1}",
        "{\"progress\":1,\"progress\":\"x\"}",
        "{\"progress\":\"x\",\"progress\":1}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    bodies.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    bodies.push(format!("{}1{}", "{\"a\":".repeat(200), "}".repeat(200)).into_bytes());
    bodies.push("[".repeat(100_000).into_bytes());
    bodies
}

/// A push body as bytes: plausible pushes, objects of field names, any JSON, truncated
/// JSON, arbitrary bytes, JSON with non-UTF-8 inside a string, and the odd bodies above.
fn push_body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        8 => plausible_push().prop_map(String::into_bytes),
        5 => object(20_000).prop_map(String::into_bytes),
        2 => json_value(300).prop_map(|v| v.to_string().into_bytes()),
        1 => (plausible_push(), any::<Index>())
            .prop_map(|(t, at)| t.as_bytes()[..at.index(t.len() + 1)].to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => (select(BAD_UTF8.to_vec()), select(vec!["progress", "stage", "status", "seq"]))
            .prop_map(|(bad, f)| [format!("{{\"{f}\":\"a").as_bytes(), bad, b"\"}"].concat()),
        1 => select(odd_bodies()),
    ]
    .boxed()
}

/// A create body as bytes: plausible ones, objects of field names, and the push body mix.
fn create_body() -> BoxedStrategy<Vec<u8>> {
    let plausible = (prop::option::of(text(2_000)), prop::option::of(uuid_like())).prop_map(
        |(prompt, user_id)| {
            let mut fields = Map::new();
            if let Some(p) = prompt {
                fields.insert("prompt".into(), p.into());
            }
            if let Some(u) = user_id {
                fields.insert("user_id".into(), u.into());
            }
            Value::Object(fields).to_string().into_bytes()
        },
    );
    prop_oneof![
        4 => plausible,
        2 => push_body(),
        1 => select(vec![b"".to_vec(), b" \n\t ".to_vec(), b"{\"prompt\":null}".to_vec()]),
    ]
    .boxed()
}

/// A WebSocket text message: protocol-shaped objects, objects of field names, any JSON,
/// any string, or a truncated message.
fn ws_text(task_ids: Vec<String>, tokens: Vec<String>) -> BoxedStrategy<String> {
    let id = prop_oneof![
        3 => select(task_ids).prop_map(Value::String),
        1 => uuid_like().prop_map(Value::String),
        1 => json_leaf(64),
    ];
    let token = prop_oneof![
        4 => select(tokens.clone()).prop_map(Value::String),
        1 => select(tokens).prop_map(|t| Value::String(format!(" {t}\n"))),
        1 => text(64).prop_map(Value::String),
        1 => json_leaf(64),
    ];
    let kind = prop_oneof![
        // No "cancel": the connection property below models subscriptions only; the parser
        // property reads cancel like subscribe (see `readme_message`).
        6 => select(vec!["subscribe", "subscribe", "subscribe", "unsubscribe"]).prop_map(Value::from),
        1 => select(WORDS.to_vec()).prop_map(Value::from),
        1 => json_leaf(64),
    ];
    let shaped = (
        prop::option::weighted(0.95, kind),
        prop::option::weighted(0.9, id),
        prop::option::weighted(0.8, token),
        prop::collection::vec(entry(64), 0..2),
    )
        .prop_map(|(kind, id, token, mut entries)| {
            let known = [("type", kind), ("task_id", id), ("token", token)];
            for (k, v) in known {
                if let Some(v) = v {
                    entries.push((k.to_string(), v.to_string()));
                }
            }
            object_text(&entries)
        })
        .boxed();
    prop_oneof![
        6 => shaped.clone(),
        2 => object(1_000),
        2 => json_value(200).prop_map(|v| v.to_string()),
        2 => text(1_000),
        1 => (shaped, any::<Index>()).prop_map(|(t, at)| {
            let chars: Vec<char> = t.chars().collect();
            chars[..at.index(chars.len() + 1)].iter().collect()
        }),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// The README's rules, restated independently of src/
// ---------------------------------------------------------------------------------------

/// A hyphenated UUID (8-4-4-4-12 hex digits, any case), ignoring surrounding whitespace.
fn hyphenated_uuid(raw: &str) -> Option<Uuid> {
    let s = raw.trim();
    let shaped = s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    shaped.then(|| Uuid::parse_str(s).expect("a hyphenated UUID parses"))
}

/// What a push body means, per the README.
#[derive(Debug, Default, PartialEq)]
struct Push {
    progress: Option<f64>,
    stage: Option<String>,
    status: Option<&'static str>,
    seq: Option<i64>,
}

/// `Ok` if the README says the body is accepted; else the fields (or `body`) at fault, any
/// one of which a refusal may name.
fn readme_push(body: &[u8]) -> Result<Push, Vec<&'static str>> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(vec!["body"]);
    };
    let mut push = Push::default();
    let mut culprits = Vec::new();
    for (name, value) in &fields {
        if value.is_null() {
            continue; // "A null counts as absent."
        }
        match name.as_str() {
            "progress" => match value
                .as_f64()
                .filter(|p| p.is_finite() && (0.0..=100.0).contains(p))
            {
                Some(p) => push.progress = Some(p),
                None => culprits.push("progress"),
            },
            "stage" => match value.as_str().filter(|s| {
                s.chars().count() <= MAX_STAGE_CHARS && !s.chars().any(char::is_control)
            }) {
                Some(s) => push.stage = Some(s.to_string()),
                None => culprits.push("stage"),
            },
            "status" => match STATUSES.iter().find(|s| value.as_str() == Some(**s)) {
                Some(s) => push.status = Some(*s),
                None => culprits.push("status"),
            },
            "seq" => match value.as_u64().and_then(|n| i64::try_from(n).ok()) {
                Some(n) => push.seq = Some(n),
                None => culprits.push("seq"),
            },
            _ => culprits.push("body"),
        }
    }
    if culprits.is_empty()
        && push.progress.is_none()
        && push.stage.is_none()
        && push.status.is_none()
    {
        culprits.push("body");
    }
    if culprits.is_empty() {
        Ok(push)
    } else {
        Err(culprits)
    }
}

/// `Ok((prompt, user_id))` if the README says the create body is accepted; else the culprits.
fn readme_create(body: &[u8]) -> Result<(Option<String>, Option<Uuid>), Vec<&'static str>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, None));
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(vec!["body"]);
    };
    let (mut prompt, mut user_id, mut culprits) = (None, None, Vec::new());
    for (name, value) in &fields {
        if value.is_null() {
            continue;
        }
        match name.as_str() {
            // Postgres text cannot hold NUL, so a prompt with one is refused.
            "prompt" => match value.as_str().filter(|p| !p.contains('\0')) {
                Some(p) => prompt = Some(p.to_string()),
                None => culprits.push("prompt"),
            },
            "user_id" => match value.as_str().and_then(hyphenated_uuid) {
                Some(u) => user_id = Some(u),
                None => culprits.push("user_id"),
            },
            _ => culprits.push("body"),
        }
    }
    if culprits.is_empty() {
        Ok((prompt, user_id))
    } else {
        Err(culprits)
    }
}

/// What a WebSocket text message means, per the protocol in src/ws/mod.rs.
#[derive(Debug, PartialEq)]
enum Request {
    Subscribe { task: Uuid, token: Option<String> },
    Unsubscribe { task: Uuid },
    Cancel { task: Uuid, token: Option<String> },
}

fn readme_message(text: &str) -> Result<Request, Vec<&'static str>> {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Err(vec!["message"]);
    };
    let task = value
        .get("task_id")
        .and_then(Value::as_str)
        .and_then(hyphenated_uuid)
        .ok_or("task_id");
    let kind = value.get("type").and_then(Value::as_str);
    match kind {
        Some("subscribe" | "cancel") => {
            let token = match value.get("token") {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(t)) => Ok(Some(t.clone())),
                Some(_) => Err("token"),
            };
            match (task, token) {
                (Ok(task), Ok(token)) if kind == Some("cancel") => {
                    Ok(Request::Cancel { task, token })
                }
                (Ok(task), Ok(token)) => Ok(Request::Subscribe { task, token }),
                (task, token) => Err([task.err(), token.err()].into_iter().flatten().collect()),
            }
        }
        Some("unsubscribe") => task
            .map(|task| Request::Unsubscribe { task })
            .map_err(|e| vec![e]),
        _ => Err(vec!["type"]),
    }
}

// ---------------------------------------------------------------------------------------
// Properties of the pure parsers
// ---------------------------------------------------------------------------------------

/// The error is `Error::Invalid` naming one of `allowed`, with a non-empty message.
fn invalid_field(error: Error, allowed: &[&str]) -> Result<(&'static str, String), TestCaseError> {
    match error {
        Error::Invalid { field, message } => {
            prop_assert!(
                allowed.contains(&field),
                "field {field:?} is not one of {allowed:?} ({message})"
            );
            prop_assert!(!message.trim().is_empty(), "empty message for {field}");
            Ok((field, message))
        }
        other => Err(TestCaseError::fail(format!(
            "expected Error::Invalid, got {other:?}"
        ))),
    }
}

const PUSH_ERROR_FIELDS: [&str; 5] = ["body", "progress", "stage", "status", "seq"];

fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() > 300 {
        let head: String = text.chars().take(300).collect();
        format!("{head:?}… ({} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

fn any_push_body() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => push_body(),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_push_bodies_never_panic_and_every_refusal_is_invalid_and_names_its_field(
        body in any_push_body()
    ) {
        if let Err(e) = ProgressUpdate::from_json(&body) {
            let (field, message) = invalid_field(e, &PUSH_ERROR_FIELDS)?;
            if field != "body" {
                prop_assert!(
                    message.starts_with(field),
                    "the message for {field} does not name it: {message}"
                );
            }
        }
    }

    #[test]
    fn accepted_push_bodies_satisfy_the_documented_invariants(body in any_push_body()) {
        if let Ok(update) = ProgressUpdate::from_json(&body) {
            let context = show(&body);
            prop_assert!(
                update.progress().is_some() || update.stage().is_some() || update.status().is_some(),
                "accepted with none of progress, stage, status: {context}"
            );
            if let Some(p) = update.progress() {
                let p = p.value();
                prop_assert!(p.is_finite() && (0.0..=100.0).contains(&p), "progress {p}: {context}");
            }
            if let Some(stage) = update.stage() {
                let stage = stage.as_str();
                prop_assert!(stage.chars().count() <= MAX_STAGE_CHARS, "long stage: {context}");
                prop_assert!(!stage.chars().any(char::is_control), "control char: {context}");
            }
            if let Some(seq) = update.seq() {
                prop_assert!(seq >= 0, "seq {seq}: {context}");
            }
        }
    }

    #[test]
    fn push_bodies_are_accepted_exactly_when_they_follow_the_readme_and_refusals_blame_a_bad_field(
        body in any_push_body()
    ) {
        let context = show(&body);
        match (ProgressUpdate::from_json(&body), readme_push(&body)) {
            (Ok(update), Ok(expected)) => {
                let got = Push {
                    progress: update.progress().map(|p| p.value()),
                    stage: update.stage().map(|s| s.as_str().to_string()),
                    status: update.status().map(|s| s.as_str()),
                    seq: update.seq(),
                };
                prop_assert_eq!(got, expected, "for {}", context);
            }
            (Err(e), Err(culprits)) => {
                let (field, message) = invalid_field(e, &PUSH_ERROR_FIELDS)?;
                prop_assert!(
                    culprits.contains(&field),
                    "refused for {field} ({message}), but the faults are {culprits:?}: {context}"
                );
            }
            (Ok(update), Err(culprits)) => {
                prop_assert!(false, "accepted as {update:?} despite {culprits:?}: {context}");
            }
            (Err(e), Ok(expected)) => {
                prop_assert!(false, "refused ({e}) though valid as {expected:?}: {context}");
            }
        }
    }

    #[test]
    fn create_bodies_are_accepted_exactly_when_prompt_is_a_string_without_nul_and_user_id_a_uuid(
        body in create_body()
    ) {
        let context = show(&body);
        match (NewTask::from_json(&body), readme_create(&body)) {
            (Ok(task), Ok((prompt, user_id))) => {
                prop_assert_eq!(task.prompt, prompt, "for {}", &context);
                prop_assert_eq!(task.user_id, user_id, "for {}", &context);
            }
            (Err(e), Err(culprits)) => {
                let (field, message) = invalid_field(e, &["body", "prompt", "user_id"])?;
                prop_assert!(
                    culprits.contains(&field),
                    "refused for {field} ({message}), but the faults are {culprits:?}: {context}"
                );
            }
            (Ok(task), Err(culprits)) => {
                prop_assert!(false, "accepted as {task:?} despite {culprits:?}: {context}");
            }
            (Err(e), Ok(expected)) => {
                prop_assert!(false, "refused ({e}) though valid as {expected:?}: {context}");
            }
        }
    }

    #[test]
    fn task_ids_parse_exactly_when_hyphenated_uuids_and_print_back_in_lowercase(
        raw in prop_oneof![3 => uuid_like(), 1 => text(64), 1 => any::<String>()]
    ) {
        match (TaskId::parse(&raw), hyphenated_uuid(&raw)) {
            (Ok(id), Some(expected)) => {
                prop_assert_eq!(id.as_uuid(), Some(expected));
                prop_assert_eq!(id.to_string(), raw.trim().to_ascii_lowercase());
            }
            (Err(e), None) => {
                let (_, message) = invalid_field(e.into(), &["task_id"])?;
                prop_assert!(message.contains("UUID"), "{}", message);
            }
            (Ok(id), None) => prop_assert!(false, "{raw:?} accepted as {id:?}"),
            (Err(e), Some(_)) => prop_assert!(false, "{raw:?} refused: {e}"),
        }
    }

    #[test]
    fn every_uuid_round_trips_through_task_id_in_either_case(bits in any::<u128>()) {
        let id = Uuid::from_u128(bits);
        let lower = id.hyphenated().to_string();
        let parsed = TaskId::parse(&lower).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.as_uuid(), Some(id));
        prop_assert_eq!(parsed.to_string(), lower);
        let upper = TaskId::parse(&id.hyphenated().to_string().to_uppercase())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(upper, parsed);
    }

    #[test]
    fn websocket_messages_parse_exactly_when_well_formed_and_every_refusal_says_what_was_expected(
        text in ws_text(
            vec![Uuid::from_u128(7).to_string(), Uuid::from_u128(7).to_string().to_uppercase()],
            vec!["t0k3n".to_string(), String::new()],
        )
    ) {
        // The connection parses the id with the table's id kind (UUID here).
        let uuid = |task: &str| TaskId::parse(task).map(|id| id.as_uuid().expect("a UUID id"));
        let got = protocol::parse(&text).and_then(|message| match message {
            ClientMessage::Subscribe { task, token } => Ok(Request::Subscribe { task: uuid(&task)?, token }),
            ClientMessage::Unsubscribe { task } => Ok(Request::Unsubscribe { task: uuid(&task)? }),
            ClientMessage::Cancel { task, token } => Ok(Request::Cancel { task: uuid(&task)?, token }),
        });
        match (got, readme_message(&text)) {
            (Ok(got), Ok(expected)) => prop_assert_eq!(got, expected, "for {:?}", text),
            (Err(e), Err(culprits)) => {
                let (field, message) = invalid_field(e, &["message", "type", "task_id", "token"])?;
                prop_assert!(
                    culprits.contains(&field),
                    "refused for {field} ({message}), but the faults are {culprits:?}: {text:?}"
                );
                prop_assert!(
                    message.contains("expected") || message.contains("UUID"),
                    "the message does not say what was expected: {message}"
                );
            }
            (Ok(got), Err(culprits)) => {
                prop_assert!(false, "accepted as {got:?} despite {culprits:?}: {text:?}");
            }
            (Err(e), Ok(expected)) => {
                prop_assert!(false, "refused ({e}) though valid as {expected:?}: {text:?}");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_make_any_parser_panic_or_fail_with_anything_but_invalid(
        bytes in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = ProgressUpdate::from_json(&bytes) {
            invalid_field(e, &PUSH_ERROR_FIELDS)?;
        }
        if let Err(e) = NewTask::from_json(&bytes) {
            invalid_field(e, &["body", "prompt", "user_id"])?;
        }
        if let Err(e) = protocol::parse(&text) {
            invalid_field(e, &["message", "type", "task_id", "token"])?;
        }
        if let Err(e) = TaskId::parse(&text) {
            invalid_field(e.into(), &["task_id"])?;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The real server
// ---------------------------------------------------------------------------------------

const PUSH_CASES: usize = 300;
const CREATE_CASES: usize = 150;
const WS_CASES: usize = 400;
/// Text frames are cut to this many bytes, under the server's 4 KiB message limit.
const WS_TEXT_BYTES: usize = 4_000;

/// `cases` values from `strategy`, from a fixed seed (or `TASKCAST_FUZZ_SEED`).
fn generate<S: Strategy>(strategy: S, cases: usize) -> Vec<S::Value> {
    let seed: u64 = std::env::var("TASKCAST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a5c_ca57);
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    (0..cases)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("the strategy yields a value")
                .current()
        })
        .collect()
}

fn max_body_bytes() -> usize {
    Limits::default().max_body_bytes
}

/// POSTs `body` as JSON with the push key. A body over the limit goes on a connection of
/// its own: the server answers 413 without reading it and then closes the connection
/// without sending `Connection: close`, so a pooled client's next request on that
/// connection can fail with a broken pipe.
async fn post_raw(app: &TestApp, path: &str, body: Vec<u8>, context: &str) -> (u16, String) {
    let client = if body.len() > max_body_bytes() {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("an HTTP client")
    } else {
        app.http.clone()
    };
    let response = client
        .post(app.url(path))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{context}: the request failed: {e:?}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("a response body"))
}

/// A non-2xx body: JSON with non-empty string `error`, `message` and `hint`.
fn error_body(text: &str, context: &str) -> Value {
    let body: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{context}: the error body is not JSON ({e}): {text}"));
    for key in ["error", "message", "hint"] {
        assert!(
            body[key].as_str().is_some_and(|s| !s.is_empty()),
            "{context}: `{key}` is not a non-empty string in {body}"
        );
    }
    body
}

/// A push to one of our tasks, or to an id segment of the generator's choosing.
#[derive(Debug, Clone)]
enum PushCase {
    Own(Vec<u8>),
    Foreign(String, Vec<u8>),
}

/// A path segment that needs no percent-encoding (and is never `.` or `..`).
fn id_segment() -> BoxedStrategy<String> {
    uuid_like()
        .prop_map(|s| {
            let kept: String = s
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '~')
                .collect();
            if kept.is_empty() {
                "x".to_string()
            } else {
                kept
            }
        })
        .boxed()
}

/// What the server should hold for a task: the README's rules applied in order.
struct Model {
    kind: StoreKind,
    id: TaskId,
    progress: Option<f64>,
    stage: Option<String>,
    status: &'static str,
    version: i64,
    last_seq: Option<i64>,
    pushes: u32,
    since_finished: u32,
}

impl Model {
    async fn fresh(app: &TestApp, kind: StoreKind) -> Model {
        Model {
            kind,
            id: app.create_task().await,
            progress: None,
            stage: None,
            status: "pending",
            version: 0,
            last_seq: None,
            pushes: 0,
            since_finished: 0,
        }
    }

    fn finished(&self) -> bool {
        ["completed", "failed", "cancelled"].contains(&self.status)
    }

    /// A task that has taken enough refusals, or pushes, makes way for a fresh one, so the
    /// apply path keeps being exercised.
    fn worn_out(&self) -> bool {
        self.since_finished >= 3 || self.pushes >= 40
    }

    /// The answer must be this state; `applied` is what the push answer says.
    fn assert_state(&self, body: &Value, applied: bool, context: &str) {
        assert_eq!(body["type"], "state", "{context}: {body}");
        assert_eq!(body["task_id"], self.id.to_string(), "{context}: {body}");
        assert_eq!(body["applied"], applied, "{context}: {body}");
        assert_eq!(body["snapshot"], false, "{context}: {body}");
        assert_eq!(body["version"], self.version, "{context}: {body}");
        assert_eq!(body["status"], self.status, "{context}: {body}");
        assert_eq!(
            body["stage"].as_str(),
            self.stage.as_deref(),
            "{context}: {body}"
        );
        match self.progress {
            None => assert!(body["progress"].is_null(), "{context}: {body}"),
            Some(p) => {
                let got = body["progress"].as_f64();
                assert!(
                    got.is_some_and(|got| same_progress(self.kind, got, p)),
                    "{context}: progress {p} was pushed, the answer is {body}"
                );
            }
        }
    }
}

/// The memory store keeps a pushed progress exactly. Postgres keeps it as NUMERIC, and its
/// float8-to-numeric cast keeps 15 significant digits (DBL_DIG): 50.317293140197776 reads
/// back as 50.3172931401978.
fn same_progress(kind: StoreKind, got: f64, pushed: f64) -> bool {
    match kind {
        StoreKind::Memory => got == pushed,
        StoreKind::Postgres => (got - pushed).abs() <= pushed.abs() * 1e-14,
    }
}

/// Fails the test with every 5xx seen, if any.
fn assert_no_server_errors(server_errors: &[String]) {
    assert!(
        server_errors.is_empty(),
        "{} requests got a 5xx; the first ones:\n{}",
        server_errors.len(),
        server_errors
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

async fn random_push_bodies_never_yield_a_5xx_and_follow_the_readme(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let limit = max_body_bytes();
    let cases = generate(
        prop_oneof![
            19 => push_body().prop_map(PushCase::Own),
            1 => (id_segment(), push_body()).prop_map(|(id, body)| PushCase::Foreign(id, body)),
        ],
        PUSH_CASES,
    );
    let mut model = Model::fresh(&app, kind).await;
    let mut tally: HashMap<u16, usize> = HashMap::new();
    let mut server_errors = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        if model.worn_out() {
            model = Model::fresh(&app, kind).await;
        }
        let (segment, body) = match case {
            PushCase::Own(body) => (model.id.to_string(), body),
            PushCase::Foreign(segment, body) => (segment, body),
        };
        let own = segment == model.id.to_string();
        let context = format!(
            "case {i} ({kind:?}), POST /api/tasks/{segment}/progress {}",
            show(&body)
        );
        let expected_refusal: Option<(u16, &str)> = if body.len() > limit {
            Some((413, "payload_too_large"))
        } else if hyphenated_uuid(&segment).is_none() {
            Some((400, "invalid_input"))
        } else {
            match readme_push(&body) {
                Err(_) => Some((400, "invalid_input")),
                Ok(_) if !own => Some((404, "not_found")),
                Ok(_) => None,
            }
        };
        let (status, text) = post_raw(
            &app,
            &format!("/api/tasks/{segment}/progress"),
            body.clone(),
            &context,
        )
        .await;
        *tally.entry(status).or_default() += 1;
        if status >= 500 {
            // What the task holds now is unknown: go on with a fresh one.
            server_errors.push(format!("{context}: {status} {text}"));
            model = Model::fresh(&app, kind).await;
            continue;
        }
        if let Some((want_status, want_code)) = expected_refusal {
            let error = error_body(&text, &context);
            assert_eq!(
                (status, error["error"].as_str()),
                (want_status, Some(want_code)),
                "{context}: {text}"
            );
            continue;
        }
        let push = readme_push(&body).expect("checked above");
        model.pushes += 1;
        let stale = matches!((push.seq, model.last_seq), (Some(seq), Some(last)) if seq <= last);
        if stale {
            assert_eq!(status, 200, "{context}: {text}");
            let body: Value = serde_json::from_str(&text).expect("a JSON state");
            model.assert_state(&body, false, &context);
        } else if model.finished() {
            model.since_finished += 1;
            let error = error_body(&text, &context);
            assert_eq!(
                (status, error["error"].as_str()),
                (409, Some("task_finished")),
                "{context}: {text}"
            );
        } else {
            assert_eq!(status, 200, "{context}: {text}");
            model.progress = push.progress.or(model.progress);
            model.stage = push.stage.or(model.stage.take());
            model.status = push.status.unwrap_or(model.status);
            model.last_seq = push.seq.or(model.last_seq);
            model.version += 1;
            let body: Value = serde_json::from_str(&text).expect("a JSON state");
            model.assert_state(&body, true, &context);
        }
    }
    assert_no_server_errors(&server_errors);
    // The mix must have exercised applying, refusing and finishing, or it proves little.
    for (status, least) in [(200, 50), (400, 50), (409, 5)] {
        assert!(
            tally.get(&status).copied().unwrap_or(0) >= least,
            "too few {status}s: {tally:?}"
        );
    }
}

async fn random_create_bodies_never_yield_a_5xx_and_follow_the_readme(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let limit = max_body_bytes();
    let mut created = 0;
    let mut server_errors = Vec::new();
    for (i, body) in generate(create_body(), CREATE_CASES)
        .into_iter()
        .enumerate()
    {
        let context = format!("case {i} ({kind:?}), POST /api/tasks {}", show(&body));
        let expected = readme_create(&body);
        let (status, text) = post_raw(&app, "/api/tasks", body.clone(), &context).await;
        if status >= 500 {
            server_errors.push(format!("{context}: {status} {text}"));
        } else if body.len() > limit {
            let error = error_body(&text, &context);
            assert_eq!(
                (status, error["error"].as_str()),
                (413, Some("payload_too_large")),
                "{context}"
            );
        } else if expected.is_err() {
            let error = error_body(&text, &context);
            assert_eq!(
                (status, error["error"].as_str()),
                (400, Some("invalid_input")),
                "{context}"
            );
        } else {
            assert_eq!(status, 201, "{context}: {text}");
            let state: Value = serde_json::from_str(&text).expect("a JSON state");
            assert_eq!(state["type"], "state", "{context}: {state}");
            assert_eq!(state["status"], "pending", "{context}: {state}");
            assert_eq!(state["version"], 0, "{context}: {state}");
            created += 1;
        }
    }
    assert_no_server_errors(&server_errors);
    assert!(created >= 10, "too few bodies were valid: {created}");
}

/// A WebSocket frame to send.
#[derive(Debug, Clone)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn cap(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// What one frame must be answered with.
enum Answer {
    /// An unsubscribe is not answered.
    Nothing,
    /// `{"type":"error","code":"invalid_input"}` without a task id.
    Malformed,
    /// The snapshot of `task`.
    Snapshot(TaskId),
    /// An error about `task` with this code.
    Refused(TaskId, &'static str),
}

async fn random_websocket_messages_each_get_one_answer_and_never_close_the_socket(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| {
        c.limits.max_subscribes_per_sec = 100_000;
        c.limits.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let tasks = [
        app.create_task().await,
        app.create_task().await,
        app.create_task().await,
    ];
    let missing = TaskId::from(Uuid::new_v4());
    // Each token and the tasks it grants; any other token is invalid.
    let minted: Vec<(String, Vec<TaskId>)> = vec![
        (app.token(&[tasks[0]]), vec![tasks[0]]),
        (app.token(&[tasks[1]]), vec![tasks[1]]),
        (app.token(&tasks), tasks.to_vec()),
        (app.token(&[missing]), vec![missing]),
    ];
    let mut ids: Vec<String> = tasks.iter().map(TaskId::to_string).collect();
    ids.push(tasks[0].to_string().to_uppercase());
    ids.push(missing.to_string());
    let tokens = minted.iter().map(|(t, _)| t.clone()).collect();
    let frames = generate(
        prop_oneof![
            12 => ws_text(ids, tokens).prop_map(|t| Frame::Text(cap(t, WS_TEXT_BYTES))),
            1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Frame::Binary),
        ],
        WS_CASES,
    );

    let answer_to = |frame: &Frame| -> Answer {
        let Frame::Text(text) = frame else {
            return Answer::Malformed;
        };
        // The connection parses the id with the table's id kind (UUID here): a bad one is
        // answered like a malformed message.
        let message = protocol::parse(text).and_then(|message| match message {
            ClientMessage::Subscribe { task, token } => Ok((TaskId::parse(&task)?, Some(token))),
            ClientMessage::Unsubscribe { task } => Ok((TaskId::parse(&task)?, None)),
            ClientMessage::Cancel { .. } => unreachable!("ws_text sends no cancel messages"),
        });
        match message {
            Err(_) => Answer::Malformed,
            Ok((_, None)) => Answer::Nothing,
            Ok((task, Some(token))) => {
                let token = token
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty());
                let Some(token) = token else {
                    return Answer::Refused(task, "token_required");
                };
                match minted.iter().find(|(t, _)| *t == token) {
                    None => Answer::Refused(task, "token_invalid"),
                    Some((_, granted)) if !granted.contains(&task) => {
                        Answer::Refused(task, "forbidden")
                    }
                    Some(_) if !tasks.contains(&task) => Answer::Refused(task, "not_found"),
                    Some(_) => Answer::Snapshot(task),
                }
            }
        }
    };

    let mut sub = app.connect("").await;
    let mut tally: HashMap<&str, usize> = HashMap::new();
    for (i, frame) in frames.iter().enumerate() {
        let context = format!("frame {i} ({kind:?}): {frame:?}");
        let message = match frame {
            Frame::Text(text) => Message::text(text.clone()),
            Frame::Binary(bytes) => Message::binary(bytes.clone()),
        };
        sub.socket.send(message).await.expect("send a frame");
        let expected = answer_to(frame);
        if matches!(expected, Answer::Nothing) {
            *tally.entry("unanswered").or_default() += 1;
            continue;
        }
        // next_message fails the test if the socket closes or stays silent.
        let reply = sub.next_message().await;
        match expected {
            Answer::Nothing => unreachable!(),
            Answer::Malformed => {
                assert_eq!(reply["type"], "error", "{context}: {reply}");
                assert_eq!(reply["code"], "invalid_input", "{context}: {reply}");
                assert!(reply.get("task_id").is_none(), "{context}: {reply}");
            }
            Answer::Snapshot(task) => {
                assert_eq!(reply["type"], "state", "{context}: {reply}");
                assert_eq!(reply["task_id"], task.to_string(), "{context}: {reply}");
                assert_eq!(reply["snapshot"], true, "{context}: {reply}");
            }
            Answer::Refused(task, code) => {
                assert_eq!(reply["type"], "error", "{context}: {reply}");
                assert_eq!(reply["task_id"], task.to_string(), "{context}: {reply}");
                assert_eq!(reply["code"], code, "{context}: {reply}");
            }
        }
        if reply["type"] == "error" {
            for key in ["message", "hint"] {
                assert!(
                    reply[key].as_str().is_some_and(|s| !s.is_empty()),
                    "{context}: no {key} in {reply}"
                );
            }
        }
        let label = match &reply["code"] {
            Value::String(code) if code == "invalid_input" => "invalid_input",
            Value::String(_) => "refused",
            _ => "state",
        };
        *tally.entry(label).or_default() += 1;
    }
    for label in ["invalid_input", "refused", "state", "unanswered"] {
        assert!(
            tally.get(label).copied().unwrap_or(0) >= 5,
            "too few {label}: {tally:?}"
        );
    }

    // Still open and still working, with nothing left over from the fuzzing.
    sub.send_json(app.subscribe_message(tasks[2])).await;
    let state = sub.next_state().await;
    assert_eq!(state["task_id"], tasks[2].to_string());
    assert_eq!(state["snapshot"], true);
    while let Ok(extra) = tokio::time::timeout(Duration::from_millis(300), sub.socket.next()).await
    {
        match extra {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("unexpected frame after the last answer: {other:?}"),
        }
    }
}

both_stores!(
    random_push_bodies_never_yield_a_5xx_and_follow_the_readme,
    random_create_bodies_never_yield_a_5xx_and_follow_the_readme,
    random_websocket_messages_each_get_one_answer_and_never_close_the_socket,
);
