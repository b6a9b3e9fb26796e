//! The query parameters of `/ws`, `GET /api/tasks/{id}` and its `/events`: `task_id`
//! and `token`.
//!
//! Parsed here rather than with `warp::query::<T>()`, whose failure to decode logs the
//! whole query string, token included, at debug. Decoding into name/value pairs cannot
//! fail (a bad percent-escape decodes lossily), so that line is never written; the rules
//! (each parameter at most once) are checked here, with a 400 that names the parameter
//! and echoes no value.

use warp::Filter;

use crate::error::Error;

/// The parameters taskcast reads; others are ignored.
#[derive(Debug, Default)]
pub struct Query {
    pub task_id: Option<String>,
    pub token: Option<String>,
}

impl Query {
    /// Refuses a parameter given twice: which of two tokens or tasks was meant is a guess.
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Result<Query, Error> {
        let mut query = Query::default();
        for (name, value) in pairs {
            let (slot, name) = match name.as_str() {
                "task_id" => (&mut query.task_id, "task_id"),
                "token" => (&mut query.token, "token"),
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(Error::invalid(
                    "query",
                    format!("{name} is given more than once in the query string; give it once"),
                ));
            }
        }
        Ok(query)
    }
}

/// The request's [`Query`]; a query string that breaks its rules is rejected with 400.
pub fn query() -> impl Filter<Extract = (Query,), Error = warp::Rejection> + Clone {
    warp::query::<Vec<(String, String)>>()
        .and_then(|pairs| async move { Query::from_pairs(pairs).map_err(warp::reject::custom) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_repeated_parameter_is_refused_without_echoing_it() {
        let query =
            Query::from_pairs(pairs(&[("task_id", "a"), ("token", "t"), ("x", "1")])).unwrap();
        assert_eq!(query.task_id.as_deref(), Some("a"));
        assert_eq!(query.token.as_deref(), Some("t"));
        let error =
            Query::from_pairs(pairs(&[("token", "secret-1"), ("token", "secret-2")])).unwrap_err();
        assert!(error.to_string().contains("token is given more than once"));
        assert!(!error.to_string().contains("secret"));
    }
}
