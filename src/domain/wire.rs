//! The state message's JSON, written field by field.
//!
//! Every push is encoded at least twice (its answer and its frame), so this is on the hot
//! path: keys are literals, strings are copied as they are unless they hold a character
//! JSON must escape, numbers go through `itoa`/`zmij` (as in `serde_json`) and times
//! through a fixed-width writer. The bytes are exactly what `serde_json` made of the
//! derived struct this replaced (a property test in `state.rs` keeps that struct and
//! compares), so clients and the hub's splicing of `snapshot` and the place in line see no
//! change.

use chrono::{DateTime, Utc};

use super::TaskStatus;

/// Appends `value` as a JSON string: copied as it is when nothing needs escaping, else
/// escaped as `serde_json` escapes.
pub(super) fn string(out: &mut String, value: &str) {
    // Every byte is looked at, without stopping at the first that needs escaping: a fold
    // without an early exit is compiled to vector compares (a stage of 80 bytes took
    // ~10 instructions per byte with `all`, which stops at the first match).
    let escape = value.bytes().fold(false, |escape, b| {
        escape | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !escape {
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
/// left to chrono itself. The date is computed once from the day number (chrono's
/// `year()`, `month()`, `day()` each decode its packed date again).
pub(super) fn time(out: &mut String, at: &DateTime<Utc>) {
    let secs = at.timestamp();
    let nanos = at.timestamp_subsec_nanos();
    if !(FIRST_SECOND_OF_YEAR_0..=LAST_SECOND_OF_YEAR_9999).contains(&secs)
        || nanos >= 1_000_000_000
    {
        out.push_str(&serde_json::to_string(at).expect("a time always serializes"));
        return;
    }
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let second_of_day = secs.rem_euclid(86_400) as u32;
    let mut text = Digits::default();
    text.byte(b'"');
    text.number(year, 4);
    let date_time = [
        (b'-', month),
        (b'-', day),
        (b'T', second_of_day / 3_600),
        (b':', second_of_day / 60 % 60),
        (b':', second_of_day % 60),
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

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z as Unix seconds: the years [`time`]
/// writes itself.
const FIRST_SECOND_OF_YEAR_0: i64 = -62_167_219_200;
const LAST_SECOND_OF_YEAR_9999: i64 = 253_402_300_799;

/// The proleptic Gregorian (year, month, day) of a day counted from 1970-01-01, for days
/// whose year is 0–9999. Years are counted from March, so the leap day ends a year: an
/// era is 400 years (146,097 days), a year of an era 365 days plus its leap days before
/// it, a month from March 153 days per 5 months.
fn civil_from_days(days: i64) -> (u32, u32, u32) {
    // Days from 0000-03-01, which is day 0 of era 0; the years written are all >= 0.
    let from_march_0 = days + 719_468;
    let era = from_march_0.div_euclid(146_097);
    let day_of_era = from_march_0.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year as u32, month as u32, day as u32)
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

    /// `value` in `width` decimal digits, zero-padded, written from the last digit.
    fn number(&mut self, mut value: u32, width: usize) {
        for slot in self.bytes[self.len..self.len + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width;
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
    fn every_day_of_years_0_to_9999_has_chronos_date() {
        use chrono::Datelike;
        let first = NaiveDate::from_ymd_opt(0, 1, 1).unwrap();
        let last = NaiveDate::from_ymd_opt(9999, 12, 31).unwrap();
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        let mut day = first;
        while day <= last {
            let days = (day - epoch).num_days();
            let expected = (day.year() as u32, day.month(), day.day());
            assert_eq!(civil_from_days(days), expected, "{day}");
            day = day.succ_opt().unwrap();
        }
        // The range [`time`] writes itself is exactly years 0–9999.
        let second = |date: NaiveDate, h, m, s| {
            Utc.from_utc_datetime(&date.and_hms_opt(h, m, s).unwrap())
                .timestamp()
        };
        assert_eq!(second(first, 0, 0, 0), FIRST_SECOND_OF_YEAR_0);
        assert_eq!(second(last, 23, 59, 59), LAST_SECOND_OF_YEAR_9999);
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
