//! A pending task's place in line: derived by taskcast from the table, never stored.

/// `position` 1 is next; `length` counts the pending tasks in the task's queue.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct QueuePlace {
    pub position: u64,
    pub length: u64,
}

impl QueuePlace {
    /// The fields as they sit in a state message, each followed by a comma:
    /// `"queue_position":3,"queue_length":5,`.
    pub fn json_fields(&self) -> String {
        format!(
            r#""queue_position":{},"queue_length":{},"#,
            self.position, self.length
        )
    }
}

/// The error a stall-failed task gets (see `crate::stall`).
pub const STALL_ERROR: &str = "the generator stopped reporting";
