//! The state message's JSON, written field by field.
//!
//! Every push is encoded at least twice (its answer and its frame), so this is on the hot
//! path: keys are literals, strings are copied as they are unless they hold a character
//! JSON must escape, numbers go through `itoa`/`zmij` (as in `serde_json`) and times
//! through a fixed-width writer. The bytes are exactly what `serde_json` made of the
//! derived struct this replaced (a property test in `state.rs` keeps that struct and
//! compares), so clients and the hub's splicing of `snapshot` and the place in line see no
//! change.

use chrono::{DateTime, Datelike, Timelike, Utc};

use super::TaskStatus;

/// Appends `value` as a JSON string: copied as it is when nothing needs escaping, else
/// escaped as `serde_json` escapes.
pub(super) fn string(out: &mut String, value: &str) {
    let plain = value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if plain {
        out.reserve(value.len() + 2);
        out.push('"');
        out.push_str(value);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(value).expect("a str always serializes"));
    }
}

/// Appends an integer.
pub(super) fn integer(out: &mut String, value: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(value));
}

/// Appends a float as `serde_json` does: the shortest form that reads back the same, and
/// `null` for NaN and the infinities.
pub(super) fn float(out: &mut String, value: f64) {
    if value.is_finite() {
        out.push_str(zmij::Buffer::new().format_finite(value));
    } else {
        out.push_str("null");
    }
}

/// Appends a time as chrono's serde form: RFC 3339 in UTC with `Z`, and as many fraction
/// digits as the time needs (none, 3, 6 or 9). Years outside 0–9999 and leap seconds are
/// left to chrono itself.
pub(super) fn time(out: &mut String, at: &DateTime<Utc>) {
    let year = at.year();
    let nanos = at.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        out.push_str(&serde_json::to_string(at).expect("a time always serializes"));
        return;
    }
    let mut text = Digits::default();
    text.byte(b'"');
    text.number(year as u32, 4);
    let date_time = [
        (b'-', at.month()),
        (b'-', at.day()),
        (b'T', at.hour()),
        (b':', at.minute()),
        (b':', at.second()),
    ];
    for (separator, value) in date_time {
        text.byte(separator);
        text.number(value, 2);
    }
    if nanos != 0 {
        let (value, width) = if nanos.is_multiple_of(1_000_000) {
            (nanos / 1_000_000, 3)
        } else if nanos.is_multiple_of(1_000) {
            (nanos / 1_000, 6)
        } else {
            (nanos, 9)
        };
        text.byte(b'.');
        text.number(value, width);
    }
    text.byte(b'Z');
    text.byte(b'"');
    out.push_str(text.as_str());
}

/// A time's text, built on the stack: at most `"YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ"`.
#[derive(Default)]
struct Digits {
    bytes: [u8; 32],
    len: usize,
}

impl Digits {
    fn byte(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// `value` in `width` decimal digits, zero-padded.
    fn number(&mut self, value: u32, width: u32) {
        for place in (0..width).rev() {
            self.byte(b'0' + (value / 10u32.pow(place) % 10) as u8);
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("ASCII digits and separators")
    }
}

/// Appends a status as its lowercase name.
pub(super) fn status(out: &mut String, value: TaskStatus) {
    out.push('"');
    out.push_str(value.as_str());
    out.push('"');
}

/// Appends `,"key":`; `key` is a literal that needs no escaping.
pub(super) fn key(out: &mut String, key: &'static str) {
    out.push_str(",\"");
    out.push_str(key);
    out.push_str("\":");
}

/// Appends `,"key":<value>` when `value` is there.
pub(super) fn optional<T: Copy>(
    out: &mut String,
    name: &'static str,
    value: Option<T>,
    write: impl FnOnce(&mut String, T),
) {
    if let Some(value) = value {
        key(out, name);
        write(out, value);
    }
}

/// Appends `,"key":<value>`, or `,"key":null` without one.
pub(super) fn nullable<T: Copy>(
    out: &mut String,
    name: &'static str,
    value: Option<T>,
    write: impl FnOnce(&mut String, T),
) {
    key(out, name);
    match value {
        Some(value) => write(out, value),
        None => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};

    use super::*;

    fn written(write: impl FnOnce(&mut String)) -> String {
        let mut out = String::new();
        write(&mut out);
        out
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        for text in [
            "",
            "plain text",
            "say \"hi\"",
            "back\\slash",
            "line\nbreak\ttab\r\u{8}\u{c}",
            "\u{1}\u{1f}\u{7f}",
            "é ü 漢字 🎨",
            "</script>",
        ] {
            assert_eq!(
                written(|out| string(out, text)),
                serde_json::to_string(text).unwrap(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn floats_are_written_as_serde_json_writes_them() {
        for value in [
            0.0,
            -0.0,
            0.5,
            10.0,
            33.333333333333336,
            100.0,
            1e-7,
            1e21,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert_eq!(
                written(|out| float(out, value)),
                serde_json::to_string(&value).unwrap(),
                "{value}"
            );
        }
    }

    #[test]
    fn times_are_written_as_chrono_serializes_them() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
        let at =
            |h, m, s, nanos| Utc.from_utc_datetime(&day.and_hms_nano_opt(h, m, s, nanos).unwrap());
        let mut times = vec![
            at(0, 0, 0, 0),
            at(9, 5, 7, 120_000_000),
            at(23, 59, 59, 123_456_000),
            at(12, 30, 1, 123_456_789),
            at(12, 30, 1, 1),
            // A leap second (chrono's nanos >= 1e9) and years outside 0–9999 take
            // chrono's own path.
            at(23, 59, 59, 1_500_000_000),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(999, 3, 4, 5, 6, 7).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            Utc::now(),
        ];
        // Every microsecond and nanosecond pattern a stored or fresh time can have.
        for nanos in [
            1_000,
            10_000,
            999_999_000,
            1_000_000,
            999_000_000,
            7,
            999_999_999,
        ] {
            times.push(at(1, 2, 3, nanos));
        }
        for time_value in times {
            assert_eq!(
                written(|out| time(out, &time_value)),
                serde_json::to_string(&time_value).unwrap(),
                "{time_value:?}"
            );
        }
    }
}
