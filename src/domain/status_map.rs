//! Statuses in the app's words: which of the values its `status` column holds mean which
//! of taskcast's five, and which word taskcast writes back for each.
//!
//! Reading is case-insensitive: the configured map first (`TASKCAST_STATUS_MAP`), then
//! taskcast's own names, then the built-in aliases. A word that maps to nothing is not an
//! error: the task is shown as `processing` (not final) with the raw word beside it.

use super::TaskStatus;

/// Words common in apps' tables, understood without configuration.
const ALIASES: &[(&str, TaskStatus)] = &[
    ("queued", TaskStatus::Pending),
    ("waiting", TaskStatus::Pending),
    ("running", TaskStatus::Processing),
    ("in_progress", TaskStatus::Processing),
    ("generating", TaskStatus::Processing),
    ("done", TaskStatus::Completed),
    ("succeeded", TaskStatus::Completed),
    ("success", TaskStatus::Completed),
    ("complete", TaskStatus::Completed),
    ("error", TaskStatus::Failed),
    ("errored", TaskStatus::Failed),
    ("canceled", TaskStatus::Cancelled),
];

/// The app's status words (`queued:pending,done:completed`), as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusMap {
    /// (word as configured, status), in the order given.
    custom: Vec<(String, TaskStatus)>,
}

impl StatusMap {
    /// Parses `word:status` pairs separated by commas; blank means none.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut custom: Vec<(String, TaskStatus)> = Vec::new();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || {
                format!(
                    "TASKCAST_STATUS_MAP: {pair:?} must be word:status, where status is one of \
                     pending, processing, completed, failed, cancelled \
                     (e.g. queued:pending,done:completed)"
                )
            };
            let (word, status) = pair.split_once(':').ok_or_else(bad)?;
            let word = word.trim();
            let status = TaskStatus::parse(&status.trim().to_ascii_lowercase()).ok_or_else(bad)?;
            if word.is_empty() || word.chars().any(char::is_control) {
                return Err(bad());
            }
            match custom.iter().find(|(w, _)| w.eq_ignore_ascii_case(word)) {
                Some((_, earlier)) if *earlier != status => {
                    return Err(format!(
                        "TASKCAST_STATUS_MAP maps {word:?} to both {} and {}",
                        earlier.as_str(),
                        status.as_str()
                    ));
                }
                Some(_) => {}
                None => custom.push((word.to_string(), status)),
            }
        }
        Ok(StatusMap { custom })
    }

    /// What a stored word means, if anything.
    pub fn read(&self, raw: &str) -> Option<TaskStatus> {
        let raw = raw.trim();
        self.custom
            .iter()
            .find(|(word, _)| word.eq_ignore_ascii_case(raw))
            .map(|(_, status)| *status)
            .or_else(|| TaskStatus::parse(&raw.to_ascii_lowercase()))
            .or_else(|| {
                ALIASES
                    .iter()
                    .find(|(word, _)| word.eq_ignore_ascii_case(raw))
                    .map(|(_, status)| *status)
            })
    }

    /// The first configured word for `status`, if the map names one.
    pub fn custom_word(&self, status: TaskStatus) -> Option<&str> {
        self.custom
            .iter()
            .find(|(_, s)| *s == status)
            .map(|(word, _)| word.as_str())
    }

    /// Every word this map reads: configured ones, taskcast's own, the aliases.
    fn known_words(&self) -> impl Iterator<Item = &str> {
        let own = TaskStatus::ALL.iter().map(|s| s.as_str());
        let aliases = ALIASES.iter().map(|(word, _)| *word);
        self.custom
            .iter()
            .map(|(w, _)| w.as_str())
            .chain(own)
            .chain(aliases)
    }
}

/// What one status column takes and means: the word written for each status (none when an
/// enum has no label for it), and the lowercase words known to read as open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusWords {
    write: [Option<String>; 5],
    open: Vec<String>,
    /// Every known word, lowercase, with what it reads as (for [`StatusWords::meaning`]).
    known: Vec<(String, TaskStatus)>,
    finished: Vec<String>,
}

impl StatusWords {
    /// A text column: the configured word for a status if there is one, else taskcast's.
    pub fn for_text(map: &StatusMap) -> Self {
        let write = TaskStatus::ALL.map(|status| {
            Some(
                map.custom_word(status)
                    .unwrap_or(status.as_str())
                    .to_string(),
            )
        });
        StatusWords {
            write,
            open: open_words(map, map.known_words()),
            known: known_words(map, map.known_words()),
            finished: finished_words(map, map.known_words()),
        }
    }

    /// An enum column: for each status, the configured word if it is a label, else
    /// taskcast's name if it is one, else the first label that means that status.
    pub fn for_enum(map: &StatusMap, labels: &[String]) -> Self {
        let write = TaskStatus::ALL.map(|status| {
            let is_label = |word: &str| labels.iter().any(|l| l == word);
            map.custom_word(status)
                .filter(|w| is_label(w))
                .or(Some(status.as_str()).filter(|w| is_label(w)))
                .or_else(|| {
                    labels
                        .iter()
                        .map(String::as_str)
                        .find(|l| map.read(l) == Some(status))
                })
                .map(str::to_string)
        });
        let words = || map.known_words().chain(labels.iter().map(String::as_str));
        StatusWords {
            write,
            open: open_words(map, words()),
            known: known_words(map, words()),
            finished: finished_words(map, words()),
        }
    }

    /// The word stored for `status`; `None` when the column cannot hold it.
    pub fn word(&self, status: TaskStatus) -> Option<&str> {
        self.write[index(status)].as_deref()
    }

    /// Lowercase words known to read as an open status, for SQL's fast path
    /// (`lower(status::text) = ANY(...)`). An allow-list: any other stored word (padded,
    /// unknown, NULL, or lowercased differently by the database's locale) takes the locked
    /// path, where [`crate::domain::TaskRow::decide`] reads it as Rust does, so SQL can never
    /// reopen a task Rust would call finished.
    pub fn open(&self) -> &[String] {
        &self.open
    }

    /// Lowercase words known to read as `status` (the app's, taskcast's, the aliases), for
    /// SQL that selects by status (`lower(status::text) = ANY(...)`): the queue's pending
    /// tasks, the stall sweep's processing ones.
    pub fn meaning(&self, status: TaskStatus) -> Vec<String> {
        (self.known.iter())
            .filter(|(_, s)| *s == status)
            .map(|(w, _)| w.clone())
            .collect()
    }
}

fn known_words<'a>(
    map: &StatusMap,
    words: impl Iterator<Item = &'a str>,
) -> Vec<(String, TaskStatus)> {
    let mut known: Vec<(String, TaskStatus)> = words
        .filter_map(|w| Some((w.to_ascii_lowercase(), map.read(w)?)))
        .collect();
    known.sort_by(|a, b| a.0.cmp(&b.0));
    known.dedup_by(|a, b| a.0 == b.0);
    known
}

impl StatusWords {
    /// Lowercase words known to read as a finished status, for the cancel statements
    /// (`NOT lower(status::text) = ANY(...)`): a deny-list, because a word that maps to
    /// nothing reads as `processing`, which a subscriber may cancel.
    pub fn finished(&self) -> &[String] {
        &self.finished
    }
}

fn finished_words<'a>(map: &StatusMap, words: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut finished: Vec<String> = words
        .filter(|w| map.read(w).is_some_and(TaskStatus::is_terminal))
        .map(str::to_ascii_lowercase)
        .collect();
    finished.sort();
    finished.dedup();
    finished
}

fn index(status: TaskStatus) -> usize {
    TaskStatus::ALL
        .iter()
        .position(|s| *s == status)
        .expect("ALL lists every status")
}

fn open_words<'a>(map: &StatusMap, words: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut open: Vec<String> = words
        .filter(|w| map.read(w).is_some_and(|s| !s.is_terminal()))
        .map(str::to_ascii_lowercase)
        .collect();
    open.sort();
    open.dedup();
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_tries_the_map_then_own_names_then_aliases_ignoring_case() {
        let map = StatusMap::parse("Finished:completed, error:processing").unwrap();
        assert_eq!(map.read("FINISHED"), Some(TaskStatus::Completed));
        assert_eq!(map.read("Completed"), Some(TaskStatus::Completed));
        assert_eq!(map.read("queued"), Some(TaskStatus::Pending));
        // The configured map wins over an alias.
        assert_eq!(map.read("error"), Some(TaskStatus::Processing));
        assert_eq!(map.read("canceled"), Some(TaskStatus::Cancelled));
        assert_eq!(map.read("reviewing"), None);
        assert_eq!(map.read(""), None);
    }

    #[test]
    fn bad_maps_are_refused_with_the_setting_named() {
        for bad in ["queued", "queued:started", ":pending", "a:pending,A:failed"] {
            let message = StatusMap::parse(bad).unwrap_err();
            assert!(message.contains("TASKCAST_STATUS_MAP"), "{message}");
        }
        assert_eq!(StatusMap::parse(" ").unwrap(), StatusMap::default());
    }

    #[test]
    fn text_columns_get_the_configured_word_or_taskcasts() {
        let map = StatusMap::parse("done:completed,queued:pending").unwrap();
        let words = StatusWords::for_text(&map);
        assert_eq!(words.word(TaskStatus::Completed), Some("done"));
        assert_eq!(words.word(TaskStatus::Failed), Some("failed"));
        assert!(words.open().contains(&"queued".to_string()));
        assert!(words.open().contains(&"running".to_string()));
        assert!(!words.open().contains(&"done".to_string()));
        assert!(!words.open().contains(&"canceled".to_string()));
        assert!(words.finished().contains(&"done".to_string()));
        assert!(words.finished().contains(&"canceled".to_string()));
        assert!(!words.finished().contains(&"queued".to_string()));
    }

    #[test]
    fn enum_columns_write_only_their_labels() {
        let labels: Vec<String> = ["queued", "running", "done", "failed"]
            .map(String::from)
            .to_vec();
        let words = StatusWords::for_enum(&StatusMap::default(), &labels);
        assert_eq!(words.word(TaskStatus::Pending), Some("queued"));
        assert_eq!(words.word(TaskStatus::Processing), Some("running"));
        assert_eq!(words.word(TaskStatus::Completed), Some("done"));
        assert_eq!(words.word(TaskStatus::Failed), Some("failed"));
        assert_eq!(words.word(TaskStatus::Cancelled), None);
    }
}
