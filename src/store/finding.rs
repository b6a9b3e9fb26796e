//! What a check of the table or the database says: one [`Finding`] per thing.

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Ok,
    Warn,
    /// taskcast cannot serve the table until this is fixed.
    Fail,
    /// The table or the database is open to anyone (Supabase's anon key).
    Critical,
}

/// One thing said about the table, with the SQL or setting that fixes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub name: &'static str,
    pub severity: Severity,
    pub message: String,
    pub fix: Option<String>,
}
