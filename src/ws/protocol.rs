//! Messages a client may send on a socket.

use serde_json::Value;

use crate::error::Error;

/// A client's request. The task id is as sent: what a valid id looks like depends on the
/// table, so the connection parses it with the store's [`crate::domain::IdKind`].
pub enum ClientMessage {
    /// Watch a task; `token` overrides the connection's `?token=` for this task.
    Subscribe {
        task: String,
        token: Option<String>,
    },
    Unsubscribe {
        task: String,
    },
    /// Ask to cancel a task; `token` overrides the connection's `?token=`.
    Cancel {
        task: String,
        token: Option<String>,
    },
}

const EXPECTED: &str =
    r#"expected {"type":"subscribe"|"unsubscribe"|"cancel","task_id":"<id>","token"?:"<token>"}"#;

/// Parses one text message; every error says what was expected.
pub fn parse(text: &str) -> Result<ClientMessage, Error> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Error::invalid(
            "message",
            format!("the message is not valid JSON ({e}); {EXPECTED}"),
        )
    })?;
    let task = || -> Result<String, Error> {
        value
            .get("task_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::invalid(
                    "task_id",
                    format!("the message has no task_id string; {EXPECTED}"),
                )
            })
    };
    let token = || match value.get("token") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) => Ok(Some(t.clone())),
        Some(_) => Err(Error::invalid(
            "token",
            format!("token must be a string; {EXPECTED}"),
        )),
    };
    match value.get("type").and_then(Value::as_str) {
        Some("subscribe") => Ok(ClientMessage::Subscribe {
            token: token()?,
            task: task()?,
        }),
        Some("cancel") => Ok(ClientMessage::Cancel {
            token: token()?,
            task: task()?,
        }),
        Some("unsubscribe") => Ok(ClientMessage::Unsubscribe { task: task()? }),
        _ => Err(Error::invalid(
            "type",
            format!("unknown message type; {EXPECTED}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskId;

    #[test]
    fn subscribe_with_and_without_token_parses() {
        let id = TaskId::random().to_string();
        let m = parse(&format!(
            r#"{{"type":"subscribe","task_id":"{id}","token":"t"}}"#
        ))
        .unwrap();
        assert!(
            matches!(m, ClientMessage::Subscribe { task, token: Some(t) } if task == id && t == "t")
        );
        let m = parse(&format!(r#"{{"type":"unsubscribe","task_id":"{id}"}}"#)).unwrap();
        assert!(matches!(m, ClientMessage::Unsubscribe { task } if task == id));
        let m = parse(&format!(r#"{{"type":"cancel","task_id":"{id}"}}"#)).unwrap();
        assert!(matches!(m, ClientMessage::Cancel { task, token: None } if task == id));
    }

    #[test]
    fn malformed_messages_say_what_was_expected() {
        for bad in [
            "",
            "[]",
            r#"{"type":"x"}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","task_id":"1","token":5}"#,
            r#"{"type":"subscribe","task_id":7}"#,
            r#"{"type":"cancel","task_id":"1","token":[]}"#,
        ] {
            let e = parse(bad).err().expect("refused");
            assert!(e.to_string().contains("expected"), "{e}");
        }
    }
}
