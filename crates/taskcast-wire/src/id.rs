//! Task ids as the app's table has them: a uuid, an integer or a text primary key.
//!
//! A [`TaskId`] is the id's text form as Postgres prints it (`id::text`), held inline so it
//! stays `Copy` and hashes without a pointer chase. Which texts are valid depends on the
//! column's type, an [`IdKind`] the store reads from the catalog: the same path segment
//! is a fine text id and a bad bigint id.

use std::fmt;

use serde::Serialize;
use uuid::Uuid;

/// Longest id, in bytes. Longer text ids cannot be watched or pushed to (a clear 400).
pub const MAX_ID_BYTES: usize = 63;

/// Why a text is not a task id: what a valid one looks like and what was given (cut to
/// 40 characters). The server answers it as a 400 naming the `task_id` field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

/// The id of a row in `public.image_tasks`, in its canonical text form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TaskId {
    len: u8,
    bytes: [u8; MAX_ID_BYTES],
}

/// The type of `image_tasks.id`, which decides what a valid id looks like.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IdKind {
    /// `uuid`: the hyphenated form, any case on input, lowercase as Postgres prints it.
    Uuid,
    /// `smallint`, `integer` or `bigint` (identity or serial): a decimal integer in range.
    Integer { min: i64, max: i64 },
    /// `text` or `varchar`: the text as it is, without spaces, commas or control
    /// characters (the NOTIFY payload separates ids with them).
    Text,
}

impl IdKind {
    pub const BIGINT: IdKind = IdKind::Integer {
        min: i64::MIN,
        max: i64::MAX,
    };

    /// Parses a client's id for a table whose id is of this kind.
    pub fn parse(self, raw: &str) -> Result<TaskId, InvalidId> {
        match self {
            IdKind::Uuid => {
                let raw = raw.trim();
                match Uuid::parse_str(raw) {
                    Ok(id) if raw.len() == 36 => Ok(TaskId::from(id)),
                    _ => Err(self.refusal(raw)),
                }
            }
            IdKind::Integer { min, max } => match raw.trim().parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => {
                    Ok(TaskId::from_stored(&n.to_string()).expect("an i64 is short"))
                }
                _ => Err(self.refusal(raw)),
            },
            IdKind::Text => {
                let plain = !raw.is_empty()
                    && !raw
                        .chars()
                        .any(|c| c.is_control() || c.is_whitespace() || c == ',');
                match TaskId::from_stored(raw) {
                    Some(id) if plain => Ok(id),
                    _ => Err(self.refusal(raw)),
                }
            }
        }
    }

    /// What a valid id looks like, for messages.
    pub fn describe(self) -> String {
        match self {
            IdKind::Uuid => "a UUID such as 0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10".to_string(),
            IdKind::Integer { min, max } => format!("an integer from {min} to {max}"),
            IdKind::Text => format!(
                "text of 1 to {MAX_ID_BYTES} bytes without spaces, commas or control characters"
            ),
        }
    }

    fn refusal(self, raw: &str) -> InvalidId {
        let shown: String = raw.chars().take(40).collect();
        InvalidId(format!(
            "task_id must be {}, got {shown:?}",
            self.describe()
        ))
    }
}

impl TaskId {
    /// Parses a UUID id (the default table's kind); see [`IdKind::parse`] for the others.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        IdKind::Uuid.parse(raw)
    }

    /// An id as the database printed it (`id::text`); `None` if it is too long to hold.
    pub fn from_stored(text: &str) -> Option<Self> {
        let len = text.len();
        if len > MAX_ID_BYTES {
            return None;
        }
        let mut bytes = [0; MAX_ID_BYTES];
        bytes[..len].copy_from_slice(text.as_bytes());
        Some(TaskId {
            len: len as u8,
            bytes,
        })
    }

    /// A fresh random (v4) UUID id, for tasks created in the in-memory store and tests.
    pub fn random() -> Self {
        TaskId::from(Uuid::new_v4())
    }

    /// The id as a UUID, when it is one (the default table's ids, and tests).
    pub fn as_uuid(&self) -> Option<Uuid> {
        Uuid::parse_str(self.as_str()).ok()
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize])
            .expect("built from a &str, cut at its end")
    }
}

impl From<Uuid> for TaskId {
    fn from(id: Uuid) -> Self {
        let mut buffer = Uuid::encode_buffer();
        TaskId::from_stored(id.hyphenated().encode_lower(&mut buffer)).expect("36 bytes fit")
    }
}

/// Hashes the text's bytes only, not the unused rest of the buffer: every map keyed by task (the
/// hub's, the estimator's, the stores') hashes about half the bytes. Equal ids have equal
/// texts (the rest is zeros), so this agrees with `Eq`.
impl std::hash::Hash for TaskId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes[..usize::from(self.len)].hash(state);
    }
}

impl PartialOrd for TaskId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TaskId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.as_str())
    }
}

/// Always a JSON string, also for integer ids (a bigint does not fit a JS number).
impl Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_ids_accept_the_hyphenated_form_in_any_case_and_print_lowercase() {
        let id = IdKind::Uuid
            .parse("0B6F1C5E-3F0E-4D7A-9A57-3C1F6C2D9E10")
            .unwrap();
        assert_eq!(id.as_str(), "0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10");
        assert!(
            IdKind::Uuid
                .parse("0b6f1c5e3f0e4d7a9a573c1f6c2d9e10")
                .is_err()
        );
        assert!(IdKind::Uuid.parse("42").is_err());
    }

    #[test]
    fn integer_ids_are_canonical_and_in_the_columns_range() {
        let int4 = IdKind::Integer {
            min: i32::MIN.into(),
            max: i32::MAX.into(),
        };
        assert_eq!(int4.parse("0042").unwrap().as_str(), "42");
        assert_eq!(IdKind::BIGINT.parse("-7").unwrap().as_str(), "-7");
        let message = int4.parse("4294967296").unwrap_err().to_string();
        assert!(message.contains("an integer from -2147483648"), "{message}");
        assert!(IdKind::BIGINT.parse("1.5").is_err());
        assert!(IdKind::BIGINT.parse("abc").is_err());
    }

    #[test]
    fn text_ids_are_kept_as_they_are_within_bounds() {
        assert_eq!(IdKind::Text.parse("Job-42_a").unwrap().as_str(), "Job-42_a");
        assert_eq!(
            IdKind::Text.parse(&"x".repeat(63)).unwrap().as_str().len(),
            63
        );
        for bad in ["", "a b", "a,b", "a\nb", &"x".repeat(64)] {
            assert!(IdKind::Text.parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_serialize_as_json_strings() {
        let id = IdKind::BIGINT.parse("9007199254740993").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""9007199254740993""#);
    }
}
