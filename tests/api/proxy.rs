//! A TCP proxy in front of Postgres for database faults, without stopping the shared
//! Postgres: an outage (every connection cut, new ones refused), a silent partition
//! (nothing forwarded, nothing closed) and lost flows (the open connections go silent for
//! good while new ones work, as when a NAT or firewall forgets its state).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::helpers::TestDb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Open,
    /// Nothing is forwarded either way; sockets stay open and new ones are accepted.
    Blackhole,
    /// Every connection is closed and new ones are closed at once.
    Down,
}

#[derive(Clone, Copy, Debug)]
struct State {
    mode: Mode,
    /// Connections opened before the current epoch are silent for good.
    epoch: u64,
}

pub struct Proxy {
    pub port: u16,
    state: watch::Sender<State>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `db`'s Postgres, which must be reached over TCP.
    pub async fn to(db: &TestDb) -> Proxy {
        let config: tokio_postgres::Config = db.url.parse().expect("a valid URL");
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("the test needs a TCP Postgres, got {other:?}"),
        };
        Proxy::start((host, config.get_ports()[0])).await
    }

    async fn start(upstream: (String, u16)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("bound").port();
        let (state, _) = watch::channel(State {
            mode: Mode::Open,
            epoch: 0,
        });
        let states = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut rx = states.subscribe();
                let born = rx.borrow().epoch;
                if rx.borrow().mode == Mode::Down {
                    continue; // closed at once: refused, as far as the client can tell
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    // Accepted during a partition: nothing goes through until it heals.
                    if !flowing(&mut rx, born).await {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (from_client, to_client) = inbound.into_split();
                    let (from_server, to_server) = outbound.into_split();
                    tokio::select! {
                        _ = pump(from_client, to_server, rx.clone(), born) => {}
                        _ = pump(from_server, to_client, rx, born) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            state,
            accept,
        }
    }

    /// An outage with RST-like symptoms: every connection closed, new ones refused.
    pub fn go_down(&self) {
        self.state.send_modify(|s| s.mode = Mode::Down);
    }

    /// A silent partition: bytes wait (as unacknowledged data would) until it heals.
    pub fn blackhole(&self) {
        self.state.send_modify(|s| s.mode = Mode::Blackhole);
    }

    /// Every connection open now goes silent for good; later ones work.
    pub fn lose_flows(&self) {
        self.state.send_modify(|s| s.epoch += 1);
    }

    /// Forwarding again (except on lost flows).
    pub fn come_back(&self) {
        self.state.send_modify(|s| s.mode = Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.send_modify(|s| s.mode = Mode::Down);
    }
}

/// Waits until a connection born in epoch `born` may forward: `false` once it must close.
async fn flowing(state: &mut watch::Receiver<State>, born: u64) -> bool {
    let open = state
        .wait_for(|s| s.mode == Mode::Down || (s.mode == Mode::Open && s.epoch == born))
        .await;
    matches!(open, Ok(s) if s.mode == Mode::Open)
}

/// Copies one direction while the state allows it; returns when either side closes or
/// the proxy goes down.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    born: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !flowing(&mut state, born).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Re-check the state; the read is cancel-safe.
            _ = state.changed() => continue,
        };
        // Bytes read just as the link went silent wait for it to come back.
        if !flowing(&mut state, born).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
