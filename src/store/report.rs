//! What taskcast will do with the table as it is, in words: the id and status types, the
//! status words mapped, and existing rows whose status means nothing. Shared by
//! `taskcast migrate` and `taskcast doctor`, so both say the same thing before any push.

use tokio_postgres::GenericClient;

pub use super::finding::{Finding, Severity};
use super::shape::{Column, Shape};
use crate::domain::{IdKind, StatusMap, TaskStatus};
use crate::error::Error;

/// Statuses in use and how many rows hold each, most common first (at most 100).
const STATUS_COUNTS: &str = "SELECT status::text, count(*) FROM public.image_tasks \
     GROUP BY 1 ORDER BY 2 DESC LIMIT 100";

/// Reads the columns and the statuses in use. Empty when the table does not exist.
pub async fn read<C: GenericClient>(
    client: &C,
    map: &StatusMap,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let columns = super::shape::columns(client).await?;
    if columns.is_empty() {
        return Ok(Vec::new());
    }
    let exposure = super::exposure::read(client).await?;
    let has_status = columns.iter().any(|c| c.name == "status");
    let counts: Vec<(Option<String>, i64)> = if has_status {
        let rows = client.query(STATUS_COUNTS, &[]).await?;
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    } else {
        Vec::new()
    };
    let mut findings = describe(&columns, map, &counts);
    findings.extend(exposure.findings());
    Ok(findings)
}

fn finding(name: &'static str, severity: Severity, message: String) -> Finding {
    Finding {
        name,
        severity,
        message,
        fix: None,
    }
}

/// Judges the columns and the statuses in use.
pub fn describe(
    columns: &[Column],
    map: &StatusMap,
    counts: &[(Option<String>, i64)],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let shape = match Shape::new(columns, map) {
        Ok(shape) => shape,
        Err(Error::SchemaMissing { .. }) => return out, // said by the schema check
        Err(e) => {
            let mut f = finding("table", Severity::Fail, e.to_string());
            f.fix = Some(if f.message.starts_with("image_tasks.id") {
                "give image_tasks a uuid, integer or text id with a deterministic collation \
                 (e.g. ALTER TABLE public.image_tasks ALTER COLUMN id TYPE bigint)"
                    .to_string()
            } else {
                "ALTER TABLE public.image_tasks ALTER COLUMN status TYPE text".to_string()
            });
            out.push(f);
            return out;
        }
    };
    let ids = match shape.id {
        IdKind::Uuid => "task ids are UUIDs".to_string(),
        kind => format!(
            "task ids are {} (sent as JSON strings)",
            kind.describe().replacen("an integer", "integers", 1)
        ),
    };
    out.push(finding(
        "id",
        Severity::Ok,
        format!("image_tasks.id is {}: {ids}", shape.id_column.type_name),
    ));
    out.extend(status_findings(&shape, map));
    out.extend(rows_findings(counts, map));
    out.extend(stall_finding(&shape));
    out
}

/// Stall detection needs `stalled_since`; without it pushes still work.
fn stall_finding(shape: &Shape) -> Option<Finding> {
    if !shape.absent.contains(&"stalled_since") {
        return None;
    }
    let mut f = finding(
        "stalled",
        Severity::Warn,
        "image_tasks has no stalled_since column: stall detection is off (quiet tasks are not marked stalled; TASKCAST_STALL_FAIL_SECS still fails them); pushes work"
            .to_string(),
    );
    f.fix = Some("taskcast migrate (adds the column)".to_string());
    Some(f)
}

fn status_findings(shape: &Shape, map: &StatusMap) -> Vec<Finding> {
    let column = &shape.status_column;
    let writes: Vec<String> = TaskStatus::ALL
        .iter()
        .filter_map(|s| {
            shape
                .words
                .word(*s)
                .map(|w| format!("{} as {w:?}", s.as_str()))
        })
        .collect();
    if !column.is_enum {
        let message = format!(
            "image_tasks.status is {}: pushes write {}",
            column.type_name,
            writes.join(", ")
        );
        return vec![finding("status", Severity::Ok, message)];
    }
    let labels = column.labels.join(", ");
    let meanings: Vec<&str> = (column.labels.iter())
        .map(|l| map.read(l).map_or("nothing", TaskStatus::as_str))
        .collect();
    let mut message = format!(
        "image_tasks.status is enum {}: values {labels} — mapped to {}",
        column.type_name,
        meanings.join(", ")
    );
    let absent: Vec<TaskStatus> = (TaskStatus::ALL.into_iter())
        .filter(|s| shape.words.word(*s).is_none())
        .collect();
    let mut out = Vec::new();
    for status in &absent {
        message.push_str(&format!(
            "; {} has no value in the enum: pushes of {} will be refused with 422",
            status.as_str(),
            status.as_str()
        ));
    }
    let mut status = finding("status", Severity::Ok, message);
    if !absent.is_empty() {
        status.severity = Severity::Warn;
        let fixes: Vec<String> = (absent.iter())
            .map(|s| {
                format!(
                    "ALTER TYPE {} ADD VALUE '{}';",
                    column.type_name,
                    s.as_str()
                )
            })
            .collect();
        status.fix = Some(format!(
            "{} (or map an existing label with TASKCAST_STATUS_MAP=<label>:<status>)",
            fixes.join(" ")
        ));
    }
    out.push(status);
    let unmapped: Vec<&str> = (column.labels.iter())
        .filter(|l| map.read(l).is_none())
        .map(String::as_str)
        .collect();
    if !unmapped.is_empty() {
        let mut f = finding(
            "status labels",
            Severity::Warn,
            format!(
                "enum labels {} map to nothing: such tasks are shown as processing (not \
                 final), with the label in status_raw",
                unmapped.join(", ")
            ),
        );
        f.fix = Some(format!(
            "TASKCAST_STATUS_MAP={}",
            (unmapped.iter())
                .map(|l| format!("{l}:<pending|processing|completed|failed|cancelled>"))
                .collect::<Vec<_>>()
                .join(",")
        ));
        out.push(f);
    }
    out
}

fn rows_findings(counts: &[(Option<String>, i64)], map: &StatusMap) -> Vec<Finding> {
    let unmapped: Vec<String> = (counts.iter())
        .filter_map(|(word, n)| {
            let word = word.as_deref()?;
            map.read(word)
                .is_none()
                .then(|| format!("{n} with status {word:?}"))
        })
        .collect();
    if unmapped.is_empty() {
        let rows: i64 = counts.iter().map(|(_, n)| n).sum();
        let message = format!("every status in the table's {rows} rows maps to one of taskcast's");
        return vec![finding("status values", Severity::Ok, message)];
    }
    let mut f = finding(
        "status values",
        Severity::Warn,
        format!(
            "existing rows whose status maps to nothing: {} (shown as processing, not final, \
             with the word in status_raw)",
            unmapped.join(", ")
        ),
    );
    f.fix = Some(
        "name them in TASKCAST_STATUS_MAP (word:status, e.g. reviewing:processing)".to_string(),
    );
    vec![f]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::REQUIRED_COLUMNS;

    fn columns(id_type: &str, status: Column) -> Vec<Column> {
        let mut out = vec![status];
        for name in REQUIRED_COLUMNS.iter().filter(|n| **n != "status") {
            let (type_name, category) = match *name {
                "id" => (id_type, "N"),
                _ => ("text", "S"),
            };
            out.push(Column {
                name: name.to_string(),
                type_name: type_name.to_string(),
                is_enum: false,
                category: category.to_string(),
                labels: Vec::new(),
                deterministic: true,
            });
        }
        out
    }

    #[test]
    fn an_enum_status_bigint_table_is_described_with_what_is_missing() {
        let status = Column {
            name: "status".to_string(),
            type_name: "image_status".to_string(),
            is_enum: true,
            category: "E".to_string(),
            labels: ["queued", "running", "done", "failed"]
                .map(String::from)
                .to_vec(),
            deterministic: true,
        };
        let counts = [
            (Some("done".to_string()), 5),
            (Some("reviewing".to_string()), 3),
        ];
        let found = describe(&columns("bigint", status), &StatusMap::default(), &counts);
        let text: Vec<&str> = found.iter().map(|f| f.message.as_str()).collect();
        assert!(text[0].contains("image_tasks.id is bigint"), "{text:?}");
        assert!(
            text[1].contains(
                "values queued, running, done, failed — mapped to pending, processing, \
                 completed, failed"
            ) && text[1].contains("cancelled has no value in the enum"),
            "{text:?}"
        );
        assert_eq!(found[1].severity, Severity::Warn);
        assert!(
            found[1]
                .fix
                .as_deref()
                .unwrap()
                .contains("ADD VALUE 'cancelled'")
        );
        assert!(text[2].contains("3 with status \"reviewing\""), "{text:?}");
    }

    #[test]
    fn an_unservable_id_type_fails_with_a_fix() {
        let status = Column {
            name: "status".to_string(),
            type_name: "text".to_string(),
            is_enum: false,
            category: "S".to_string(),
            labels: Vec::new(),
            deterministic: true,
        };
        let found = describe(&columns("numeric", status), &StatusMap::default(), &[]);
        assert_eq!(found[0].severity, Severity::Fail);
        assert!(found[0].fix.as_deref().unwrap().contains("bigint"));
    }
}
