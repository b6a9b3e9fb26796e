//! TLS to Postgres as libpq's `sslmode` defines it, against a throwaway cluster with
//! `ssl = on` and a certificate authority this test makes itself (so `verify-full` can be
//! tested, which Debian's self-signed "snakeoil" certificate cannot).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use std::error::Error as _;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::json;
use taskcast::store::connect::PgTarget;

use crate::helpers::{WAIT, spawn_app_on_with};

/// A certificate authority and a server certificate it signed for `db.test` and 127.0.0.1.
pub struct Pki {
    pub ca_pem: String,
    pub server_pem: String,
    pub server_key_pem: String,
}

pub fn pki(ca_name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut server = CertificateParams::new(vec!["db.test".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let server_key = KeyPair::generate().unwrap();
    let server_pem = server.signed_by(&server_key, &issuer).unwrap().pem();
    Pki {
        ca_pem,
        server_pem,
        server_key_pem: server_key.serialize_pem(),
    }
}

/// The directory holding `initdb` and `pg_ctl`, highest version first.
fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().expect(
        "PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql: \
         scripts/with-postgres installs them",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a server binary as `postgres` when we are root (Postgres refuses to run as root).
fn as_postgres(program: &Path, args: &[&str]) -> std::process::Output {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    command
        .args(args)
        .output()
        .expect("run a PostgreSQL binary")
}

/// A throwaway cluster with `ssl = on`, stopped and deleted on drop.
struct TlsCluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    ca: PathBuf,
}

impl TlsCluster {
    /// `tls_only`: pg_hba accepts TLS connections only (`hostssl`), as a database with
    /// "enforce SSL" does.
    fn start(pki: &Pki, tls_only: bool) -> TlsCluster {
        let bin = pg_bin();
        let dir =
            std::env::temp_dir().join(format!("taskcast-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca = write("ca.crt", &pki.ca_pem);
        let cert = write("server.crt", &pki.server_pem);
        let key = write("server.key", &pki.server_key_pem);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = dir.join("data");
        let init = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
            dir.display(),
            cert.display(),
            key.display()
        );
        let mut postgresql_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        postgresql_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), postgresql_conf).unwrap();
        let hba = if tls_only {
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n"
        } else {
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        };
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let started = as_postgres(
            &bin.join("pg_ctl"),
            &[
                "start",
                "-D",
                data.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "-l",
                dir.join("log").to_str().unwrap(),
            ],
        );
        assert!(
            started.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        TlsCluster { dir, port, bin, ca }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        as_postgres(
            &self.bin.join("pg_ctl"),
            &["stop", "-D", data.to_str().unwrap(), "-m", "immediate"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Connects as taskcast does (the same parsing and connector), and asks the server whether
/// the session is encrypted.
async fn connect(url: &str) -> Result<bool, String> {
    let target = PgTarget::parse(url).map_err(|e| e.to_string())?;
    let connecting = target.config.connect(target.tls.clone());
    let (client, connection) = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("an answer in time")
        .map_err(|e| {
            format!(
                "{e}: {}",
                e.source().map(|s| s.to_string()).unwrap_or_default()
            )
        })?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_behave_as_libpq_against_a_server_with_our_own_ca() {
    let pki = pki("taskcast test CA");
    let cluster = TlsCluster::start(&pki, true);
    let ca = format!("sslrootcert={}", cluster.ca.display());

    // require: encrypted, certificate not checked.
    assert_eq!(
        connect(&cluster.url("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    // prefer (the default) takes TLS when offered.
    assert_eq!(connect(&cluster.url("127.0.0.1", "")).await, Ok(true));
    // verify-full: the right CA and a name the certificate holds (its IP address).
    let full = cluster.url("127.0.0.1", &format!("sslmode=verify-full&{ca}"));
    assert_eq!(connect(&full).await, Ok(true));
    // verify-full to a name the certificate does not hold; verify-ca does not check it.
    let wrong_name = connect(&cluster.url("localhost", &format!("sslmode=verify-full&{ca}"))).await;
    let message = wrong_name.expect_err("a certificate for db.test is not valid for localhost");
    assert!(
        message.contains("NotValidForName") || message.contains("not valid for name"),
        "{message}"
    );
    let chain_only = cluster.url("localhost", &format!("sslmode=verify-ca&{ca}"));
    assert_eq!(connect(&chain_only).await, Ok(true));
    // A CA that did not sign the server's certificate.
    let other = pki_ca_file(&cluster.dir);
    let wrong_ca = cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
    );
    let message = connect(&wrong_ca)
        .await
        .expect_err("an unknown issuer is refused");
    assert!(message.to_lowercase().contains("issuer"), "{message}");
    // Below verify-full the chain is still checked whenever a root is given: verify-ca, and
    // require with sslrootcert (libpq then behaves as verify-ca), refuse the unknown issuer.
    for mode in ["verify-ca", "require"] {
        let wrong_ca = cluster.url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={}", other.display()),
        );
        let message = connect(&wrong_ca)
            .await
            .expect_err("an unknown issuer is refused");
        assert!(
            message.to_lowercase().contains("issuer"),
            "{mode}: {message}"
        );
    }
    // verify-full without a root certificate is refused before connecting.
    let message = connect(&cluster.url("127.0.0.1", "sslmode=verify-full"))
        .await
        .expect_err("no root certificate");
    assert!(
        message.contains("needs the server's CA certificate"),
        "{message}"
    );
    // disable against a server that requires TLS: the server's own refusal.
    let message = connect(&cluster.url("127.0.0.1", "sslmode=disable"))
        .await
        .expect_err("the server requires TLS");
    assert!(message.contains("no encryption"), "{message}");
}

/// A second, unrelated CA's certificate, written beside the cluster's files.
fn pki_ca_file(dir: &Path) -> PathBuf {
    let path = dir.join("other-ca.crt");
    std::fs::write(&path, pki("another CA").ca_pem).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_service_runs_over_verify_full() {
    let pki = pki("taskcast test CA");
    let cluster = TlsCluster::start(&pki, true);
    let url = cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", cluster.ca.display()),
    );
    // migrate, the pool, the listener: all over TLS (the server refuses anything else).
    taskcast::store::schema::migrate(&url)
        .await
        .expect("migrate over verify-full");
    let app = spawn_app_on_with(url.clone(), None, |_| {}).await;
    let task = app.create_task().await;
    let mut watcher = app.subscribe(task).await;
    watcher.next_state().await;
    app.push_ok(task, json!({"progress": 12})).await;
    assert_eq!(watcher.next_state().await["progress"], 12.0);
    // A plain SQL change reaches the subscriber through the listener's TLS connection.
    let target = PgTarget::parse(&url).unwrap();
    let (client, connection) = target.config.connect(target.tls).await.unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "UPDATE public.image_tasks SET progress = 34 WHERE id = $1",
            &[&task.as_uuid()],
        )
        .await
        .unwrap();
    assert_eq!(watcher.next_state().await["progress"], 34.0);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    // doctor asks the server and says the session is encrypted and verified.
    let output = crate::process::taskcast(&[("DATABASE_URL", url.as_str())], &["doctor"])
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    let line = printed
        .lines()
        .find(|l| l.contains(" tls "))
        .unwrap_or_else(|| panic!("no tls line:\n{printed}"));
    assert!(
        line.starts_with("ok") && line.contains("certificate and host name verified"),
        "{line}"
    );
}
