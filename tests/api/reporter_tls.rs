//! The Rust reporter over https: a TLS-terminating proxy this test runs (rustls, a
//! certificate from a CA the test makes) in front of a real taskcast.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use taskcast::domain::TaskStatus;
use taskcast_reporter::{Options, Reporter, RootCa, Update};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::helpers::{KEY, StoreKind, WAIT, spawn_app};
use crate::tls::{Pki, pki};

/// Terminates TLS on 127.0.0.1 with `pki`'s server certificate and forwards the plain
/// bytes to `upstream`. Counts completed handshakes.
struct TlsProxy {
    url: String,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(pki: &Pki, upstream: std::net::SocketAddr) -> TlsProxy {
        let certs = CertificateDer::pem_slice_iter(pki.server_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let accepting = tokio::time::timeout(WAIT, acceptor.accept(socket));
                    let Ok(Ok(mut tls)) = accepting.await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsProxy {
            url,
            handshakes,
            task,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn trusting(ca_pem: &str) -> Options {
    Options {
        max_attempts: 2,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(20),
        extra_root_cas: RootCa::from_pem(ca_pem.as_bytes()).expect("a PEM CA"),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reporter_pushes_over_https_when_given_the_servers_ca() {
    let app = spawn_app(StoreKind::Memory).await;
    let task = app.create_task().await;
    let pki = pki("reporter test CA");
    let proxy = TlsProxy::start(&pki, app.addr).await;
    let reporter = Reporter::new(&proxy.url, KEY, trusting(&pki.ca_pem));
    reporter.report(
        task,
        Update::new().status(TaskStatus::Processing).progress(40.0),
    );
    reporter.report(task, Update::completed("https://cdn.example.com/a.png"));
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());
    let stats = reporter.stats();
    assert!(stats.sent >= 1 && stats.failed == 0, "{stats:?}");
    assert!(proxy.handshakes.load(Ordering::SeqCst) >= 1);
    let stored: serde_json::Value = app.get_task(task).await.json().await.unwrap();
    assert_eq!(stored["status"], "completed", "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reporter_refuses_a_server_certificate_from_a_ca_it_does_not_trust() {
    let app = spawn_app(StoreKind::Memory).await;
    let task = app.create_task().await;
    let pki = pki("the server's CA");
    let proxy = TlsProxy::start(&pki, app.addr).await;
    let other = crate::tls::pki("another CA");
    let public_only = Options {
        extra_root_cas: Vec::new(),
        ..trusting(&other.ca_pem)
    };
    for options in [trusting(&other.ca_pem), public_only] {
        let reporter = Reporter::new(&proxy.url, KEY, options);
        reporter.report(task, Update::new().progress(10.0));
        assert!(!reporter.flush(WAIT).await, "flush reports the failure");
        let stats = reporter.stats();
        assert_eq!((stats.sent, stats.failed), (0, 1), "{stats:?}");
        // An untrusted certificate fails the same way every time: not retried.
        assert_eq!(stats.retried, 0, "{stats:?}");
    }
    assert_eq!(proxy.handshakes.load(Ordering::SeqCst), 0);
    let stored: serde_json::Value = app.get_task(task).await.json().await.unwrap();
    assert_eq!(stored["version"], 0, "nothing reached taskcast: {stored}");
}

#[test]
fn a_root_ca_that_is_not_pem_is_refused_with_what_was_expected() {
    let refused = RootCa::from_pem(b"not a certificate").unwrap_err();
    assert!(refused.contains("BEGIN CERTIFICATE"), "{refused}");
}
