//! [`Secret`]: a value that must never reach a log line.

use std::fmt;

/// A value that must never be printed. `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that needs it (comparing, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_as_stars_whichever_way_it_is_formatted() {
        let key = Secret::new("push-key-0123456789");
        assert_eq!(
            format!("{key} {key:?} {:?}", Some(&key)),
            "*** *** Some(***)"
        );
        assert_eq!(key.expose(), "push-key-0123456789");
    }
}
