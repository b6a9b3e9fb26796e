//! How taskcast reaches Postgres: the one place that reads `DATABASE_URL`, for the pool,
//! the listener, `migrate` and `doctor` alike.
//!
//! TLS follows libpq's `sslmode` (rustls, no OpenSSL):
//! - `disable`: never TLS.
//! - `allow`, `prefer` (the default): TLS when the server offers it, the certificate not
//!   checked (as libpq does: encryption against a passive listener only).
//! - `require`: TLS or no connection; the certificate is not checked, unless
//!   `sslrootcert` is given, which makes it `verify-ca` (as libpq does).
//! - `verify-ca`: TLS, and the certificate must chain to `sslrootcert`.
//! - `verify-full`: `verify-ca`, and the certificate must name the host connected to.
//!
//! `sslrootcert` is a PEM file (Supabase's CA certificate can be downloaded from the
//! project's database settings); without it, `verify-*` read `~/.postgresql/root.crt`
//! like libpq, and refuse to start when it does not exist.

mod tls;

use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::Error;

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(raw: &str) -> Result<Self, Error> {
        Ok(match raw {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                let shown: String = other.chars().take(20).collect();
                return Err(invalid(format!(
                    "sslmode must be disable, allow, prefer, require, verify-ca or \
                     verify-full, got {shown:?}"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// What the certificate check ends up being.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// No certificate check (or no TLS at all with `disable`).
    None,
    /// The chain, not the host name.
    Chain,
    /// The chain and the host name.
    Full,
}

/// A parsed `DATABASE_URL`: the driver's config, the TLS connector that goes with it, and
/// what was asked for.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub mode: SslMode,
    pub verification: Verification,
}

impl PgTarget {
    /// Parses a URL (`postgres://…?sslmode=…`) or key/value string (`host=… sslmode=…`).
    /// Errors never quote the string: it may hold a password.
    pub fn parse(url: &str) -> Result<PgTarget, Error> {
        let (rest, sslmode, rootcert) = take_ssl_params(url.trim());
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            invalid(format!(
                "DATABASE_URL is not a valid Postgres connection string: {e}"
            ))
        })?;
        let mode = match sslmode.as_deref() {
            Some(raw) => SslMode::parse(raw)?,
            None => SslMode::Prefer,
        };
        let verification = match (mode, &rootcert) {
            (SslMode::VerifyFull, _) => Verification::Full,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Verification::Chain,
            _ => Verification::None,
        };
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        let roots = match verification {
            Verification::None => None,
            _ => Some(tls::root_certificates(rootcert, mode)?),
        };
        Ok(PgTarget {
            config,
            tls: MakeRustlsConnect::new(tls::client_config(verification, roots)),
            mode,
            verification,
        })
    }

    /// Whether every host is this machine (loopback or a Unix socket): cleartext there
    /// crosses no network.
    pub fn is_local(&self) -> bool {
        self.config.get_hosts().iter().all(|host| match host {
            Host::Tcp(name) => {
                let name = name.trim_start_matches('[').trim_end_matches(']');
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            #[cfg(unix)]
            Host::Unix(_) => true,
        })
    }
}

/// Shows the TLS choice only: the config holds the password.
impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("mode", &self.mode)
            .field("verification", &self.verification)
            .finish_non_exhaustive()
    }
}

fn invalid(message: String) -> Error {
    Error::invalid("DATABASE_URL", message)
}

/// Splits `sslmode` and `sslrootcert` off a connection string (the driver knows neither
/// `verify-*` nor `sslrootcert`), returning the rest and the two values.
fn take_ssl_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut sslmode, mut rootcert) = (None, None);
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            sslmode = Some(value);
            true
        }
        "sslrootcert" => {
            rootcert = Some(value);
            true
        }
        _ => false,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let kept: Vec<&str> = (query.split('&'))
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(key, percent_decode(value))
                    })
                    .collect();
                match kept.is_empty() {
                    true => base.to_string(),
                    false => format!("{base}?{}", kept.join("&")),
                }
            }
        }
    } else {
        let mut rest = String::with_capacity(url.len());
        let mut last = 0;
        for (start, end, key, value) in key_values(url) {
            if take(key, value) {
                rest.push_str(&url[last..start]);
                last = end;
            }
        }
        rest.push_str(&url[last..]);
        rest
    };
    (rest, sslmode, rootcert)
}

/// The `key = value` pairs of a libpq key/value string, with each pair's byte span and its
/// value unquoted (`'a b'`, `\'`).
fn key_values(text: &str) -> Vec<(usize, usize, &str, String)> {
    let bytes = text.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            return pairs;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &text[start..i];
        i = skip_space(i);
        if i >= bytes.len() || bytes[i] != b'=' {
            return pairs; // malformed: the driver's parser reports it
        }
        i = skip_space(i + 1);
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        let end = i.min(bytes.len());
        pairs.push((
            start,
            end,
            key,
            String::from_utf8_lossy(&value).into_owned(),
        ));
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_params_come_off_urls_and_key_value_strings() {
        let (rest, mode, root) = take_ssl_params(
            "postgres://u:p@db.example.com:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.crt",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/tmp/ca.crt"));
        let (rest, mode, root) = take_ssl_params(
            "host=db sslmode = 'verify-ca' user=u sslrootcert='/a b/ca.crt' dbname=x",
        );
        assert_eq!(rest, "host=db  user=u  dbname=x");
        assert_eq!(mode.as_deref(), Some("verify-ca"));
        assert_eq!(root.as_deref(), Some("/a b/ca.crt"));
        let (rest, mode, _) = take_ssl_params("postgres://u@h/db");
        assert_eq!((rest.as_str(), mode), ("postgres://u@h/db", None));
    }

    #[test]
    fn modes_parse_as_libpq_names_them_and_others_are_refused_without_the_url() {
        let target = PgTarget::parse("postgres://u:secretpw@h/db?sslmode=disable").unwrap();
        assert_eq!(
            (target.mode, target.verification),
            (SslMode::Disable, Verification::None)
        );
        let target = PgTarget::parse("host=h user=u").unwrap();
        assert_eq!(target.mode, SslMode::Prefer);
        let e = PgTarget::parse("postgres://u:secretpw@h/db?sslmode=verify").unwrap_err();
        let message = e.to_string();
        assert!(message.contains("sslmode must be"), "{message}");
        assert!(!message.contains("secretpw"), "{message}");
        let e = PgTarget::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent")
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read sslrootcert /nonexistent"),
            "{e}"
        );
    }

    #[test]
    fn loopback_and_sockets_are_local_and_other_hosts_are_not() {
        let local = |url: &str| PgTarget::parse(url).unwrap().is_local();
        assert!(local("postgres://u@127.0.0.1/db"));
        assert!(local("postgres://u@localhost/db"));
        assert!(local("host=/var/run/postgresql user=u"));
        assert!(local("postgres://u@[::1]/db"));
        assert!(!local("postgres://u@db.example.com/db"));
        assert!(!local("postgres://u@10.0.0.5/db"));
    }
}
