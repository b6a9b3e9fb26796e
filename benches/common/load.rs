//! The load: WebSocket subscribers that time every frame they receive, and a paced
//! pusher. Both live in the bench process, so a push's send time and its frame's arrival
//! are read from the same clock.
//!
//! Every push carries its phase and its send time (nanoseconds since [`epoch`]) in its
//! stage text, as `@p=<phase> @t=<ns>`. Taskcast copies the stage into the frame it sends
//! and the floor forwards the body as it is, so a subscriber needs no lookup table.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use super::BoxError;
use super::report::Progress;
use super::stats::Histogram;

/// Phases a run may label its pushes with (warm-up, measured rounds, saturation steps).
pub const MAX_PHASES: usize = 64;
/// How long a subscriber waits for its first message (snapshot or "subscribed").
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The clock every timestamp in a push is relative to.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// A push body of 130-150 bytes whose stage text carries `phase` and the send time.
pub fn push_body(phase: usize, step: u64) -> String {
    format!(
        r#"{{"progress":{},"stage":"sampling step {}/50, dpm++ 2m karras, cfg 7.0, 1024x1024 @p={phase} @t={}","status":"processing"}}"#,
        step % 100,
        step % 50 + 1,
        now_ns()
    )
}

/// The number after `marker` in `text`.
fn number_after(text: &[u8], marker: &[u8]) -> Option<u64> {
    let at = text.windows(marker.len()).position(|w| w == marker)? + marker.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// What the subscribers saw, per phase and in total.
pub struct LoadStats {
    /// Timed frames received, whatever their phase (for rates over a time window).
    pub arrivals: AtomicU64,
    pub phases: Vec<PhaseStats>,
    /// Subscribers whose connection ended while the bench still wanted it.
    pub lost: AtomicU64,
}

#[derive(Default)]
pub struct PhaseStats {
    pub delivered: AtomicU64,
    /// Push → receive, microseconds.
    pub latency: Histogram,
}

impl Default for LoadStats {
    fn default() -> Self {
        LoadStats {
            arrivals: AtomicU64::new(0),
            phases: (0..MAX_PHASES).map(|_| PhaseStats::default()).collect(),
            lost: AtomicU64::new(0),
        }
    }
}

impl LoadStats {
    pub fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    pub fn delivered(&self, phase: usize) -> u64 {
        self.phases[phase].delivered.load(Ordering::Relaxed)
    }

    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    fn on_frame(&self, text: &[u8]) {
        let now = now_ns();
        let (Some(phase), Some(sent)) = (number_after(text, b"@p="), number_after(text, b"@t="))
        else {
            return;
        };
        self.arrivals.fetch_add(1, Ordering::Relaxed);
        let phase = &self.phases[(phase as usize).min(MAX_PHASES - 1)];
        phase.delivered.fetch_add(1, Ordering::Relaxed);
        phase.latency.record_us(now.saturating_sub(sent) / 1000);
    }
}

/// One WebSocket to open: the URL (its path and query subscribe), the server's address,
/// and the loopback source address to connect from (`None`: the kernel's choice).
#[derive(Clone)]
pub struct Subscribe {
    pub url: String,
    pub server: SocketAddr,
    pub source: Option<Ipv4Addr>,
}

/// Open subscriber connections, each read by its own task until [`close`](Self::close).
pub struct Subscribers {
    readers: Vec<JoinHandle<()>>,
    closing: Arc<std::sync::atomic::AtomicBool>,
}

type Ws = WebSocketStream<TcpStream>;

impl Subscribers {
    /// Opens every connection (at most `concurrency` handshakes at once), waits for each
    /// one's first message, then starts its reader.
    pub async fn open(
        specs: Vec<Subscribe>,
        stats: Arc<LoadStats>,
        concurrency: usize,
        progress: &Progress,
    ) -> Result<Subscribers, BoxError> {
        let total = specs.len();
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::with_capacity(total);
        let mut opened = stream::iter(specs)
            .map(|spec| async move { open_with_retries(&spec).await })
            .buffer_unordered(concurrency.max(1));
        while let Some(ws) = opened.next().await {
            let ws = ws?;
            readers.push(tokio::spawn(read(ws, stats.clone(), closing.clone())));
            if readers.len() % 250 == 0 || readers.len() == total {
                progress.update(&format!("connected {}/{total}", readers.len()));
            }
        }
        Ok(Subscribers { readers, closing })
    }

    pub fn len(&self) -> usize {
        self.readers.len()
    }

    /// Closes every connection (by dropping it).
    pub async fn close(self) {
        self.closing.store(true, Ordering::Relaxed);
        for reader in &self.readers {
            reader.abort();
        }
        for reader in self.readers {
            let _ = reader.await;
        }
    }
}

async fn open_with_retries(spec: &Subscribe) -> Result<Ws, BoxError> {
    let mut attempt = 0;
    loop {
        match open(spec).await {
            Ok(ws) => return Ok(ws),
            Err(_) if attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => return Err(format!("{}: {e}", spec.url).into()),
        }
    }
}

async fn open(spec: &Subscribe) -> Result<Ws, BoxError> {
    let stream = match spec.source {
        Some(ip) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip.into(), 0))?;
            socket.connect(spec.server).await?
        }
        None => TcpStream::connect(spec.server).await?,
    };
    stream.set_nodelay(true)?;
    // A small read buffer keeps 10,000+ clients cheap for the load process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = client_async_with_config(spec.url.as_str(), stream, Some(config)).await?;
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, ws.next())
        .await
        .map_err(|_| "no first message")?
        .ok_or("closed before the first message")??;
    let text = first.to_text()?;
    if text.contains(r#""type":"error""#) {
        return Err(format!("refused: {text}").into());
    }
    Ok(ws)
}

async fn read(mut ws: Ws, stats: Arc<LoadStats>, closing: Arc<std::sync::atomic::AtomicBool>) {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => stats.on_frame(text.as_bytes()),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {} // pings are answered by tungstenite
        }
    }
    if !closing.load(Ordering::Relaxed) {
        stats.lost.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where pushes go: one URL per task, pushed round-robin.
pub struct PushTarget {
    /// One per task; with `tcp`, the topic names instead.
    pub urls: Vec<String>,
    /// `Authorization` header value, if the server wants one.
    pub authorization: Option<String>,
    /// Push as plain TCP lines `<topic> <body>\n` to this address (the floor's second
    /// publish path) instead of HTTP; nothing is answered, so no ack time is recorded.
    pub tcp: Option<SocketAddr>,
    /// Push as lines of taskcast's push streams (`POST /api/progress/stream`) to this
    /// address instead of one POST each; `urls` are then the task ids.
    pub stream: Option<SocketAddr>,
}

/// A paced run's schedule: `rate` pushes per second for `duration`, checked every
/// millisecond; a push the schedule could not send by a second past the end is not sent.
struct Pace {
    tick: tokio::time::Interval,
    started: Instant,
    give_up: Duration,
    rate: f64,
    scheduled: u64,
}

impl Pace {
    fn new(rate: f64, duration: Duration) -> Pace {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Pace {
            tick,
            started: Instant::now(),
            give_up: duration + Duration::from_secs(1),
            rate,
            scheduled: (rate * duration.as_secs_f64()).round() as u64,
        }
    }

    /// Waits for the next tick: how many pushes are due by then in all, or `None` once
    /// `issued` reached the schedule or the run is past its end.
    async fn due(&mut self, issued: u64) -> Option<u64> {
        if issued >= self.scheduled {
            return None;
        }
        self.tick.tick().await;
        let elapsed = self.started.elapsed();
        if elapsed > self.give_up {
            return None;
        }
        Some(((elapsed.as_secs_f64() * self.rate) as u64 + 1).min(self.scheduled))
    }
}

impl Pushed {
    /// A run that could not start: every scheduled push failed.
    fn none_sent(scheduled: u64) -> Pushed {
        Pushed {
            scheduled,
            failed: scheduled,
            ..Pushed::default()
        }
    }
}

/// The line pushers' connections to `addr` (TCP_NODELAY set), or `None` if one failed.
async fn connect_pushers(addr: SocketAddr) -> Option<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(TCP_PUSH_CONNECTIONS);
    for _ in 0..TCP_PUSH_CONNECTIONS {
        let stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        streams.push(stream);
    }
    Some(streams)
}

/// Connections the TCP pusher spreads its lines over.
const TCP_PUSH_CONNECTIONS: usize = 4;

/// The result of one paced run.
#[derive(Default)]
pub struct Pushed {
    /// Pushes the schedule called for.
    pub scheduled: u64,
    /// Pushes answered 200.
    pub ok: u64,
    /// Pushes answered otherwise, or not answered.
    pub failed: u64,
    /// Request → answer, microseconds.
    pub ack: Arc<Histogram>,
}

/// Sends pushes at a steady rate, round-robin over the target's tasks, with at most
/// `max_inflight` requests outstanding. A push the schedule could not send in time
/// (every slot busy until well past the end) is counted as scheduled but not sent.
pub struct Pusher {
    client: reqwest::Client,
    target: Arc<PushTarget>,
    next: AtomicUsize,
    max_inflight: usize,
}

impl Pusher {
    pub fn new(target: PushTarget, max_inflight: usize) -> Result<Pusher, BoxError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(max_inflight)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Pusher {
            client,
            target: Arc::new(target),
            next: AtomicUsize::new(0),
            max_inflight,
        })
    }

    /// Pushes `rate` per second for `duration`, labelled `phase`.
    pub async fn run(&self, rate: f64, duration: Duration, phase: usize) -> Pushed {
        if let Some(addr) = self.target.tcp {
            return self.run_lines(addr, rate, duration, phase).await;
        }
        if let Some(addr) = self.target.stream {
            return self.run_stream(addr, rate, duration, phase).await;
        }
        let scheduled = (rate * duration.as_secs_f64()).round() as u64;
        let slots = Arc::new(Semaphore::new(self.max_inflight));
        let ack = Arc::new(Histogram::default());
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut pace = Pace::new(rate, duration);
        let mut issued = 0u64;
        'schedule: while let Some(due) = pace.due(issued).await {
            while issued < due {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break 'schedule;
                };
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let url = &self.target.urls[n % self.target.urls.len()];
                let mut request = self.client.post(url.as_str());
                if let Some(auth) = &self.target.authorization {
                    request = request.header("authorization", auth.as_str());
                }
                let (ack, ok, failed) = (ack.clone(), ok.clone(), failed.clone());
                let step = (n / self.target.urls.len()) as u64;
                tokio::spawn(async move {
                    let request = request
                        .header("content-type", "application/json")
                        .body(push_body(phase, step));
                    let sent = Instant::now();
                    let answered = match request.send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    if answered {
                        ack.record(sent.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
                issued += 1;
            }
        }
        let all = u32::try_from(self.max_inflight).unwrap_or(u32::MAX);
        let _ = slots.acquire_many(all).await;
        Pushed {
            scheduled,
            ok: ok.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed) + (scheduled - issued),
            ack,
        }
    }
}

impl Pusher {
    /// [`Pusher::run`] over plain TCP lines: the pace is the same, each push is one write.
    async fn run_lines(
        &self,
        addr: SocketAddr,
        rate: f64,
        duration: Duration,
        phase: usize,
    ) -> Pushed {
        use tokio::io::AsyncWriteExt;
        let scheduled = (rate * duration.as_secs_f64()).round() as u64;
        let Some(mut streams) = connect_pushers(addr).await else {
            return Pushed::none_sent(scheduled);
        };
        let mut pace = Pace::new(rate, duration);
        let (mut issued, mut ok) = (0u64, 0u64);
        while let Some(due) = pace.due(issued).await {
            while issued < due {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let topic = &self.target.urls[n % self.target.urls.len()];
                let step = (n / self.target.urls.len()) as u64;
                let line = format!("{topic} {}\n", push_body(phase, step));
                let stream = &mut streams[n % TCP_PUSH_CONNECTIONS];
                if stream.write_all(line.as_bytes()).await.is_ok() {
                    ok += 1;
                }
                issued += 1;
            }
        }
        Pushed {
            scheduled,
            ok,
            failed: scheduled - ok,
            ack: Arc::new(Histogram::default()),
        }
    }
}

/// One push stream of [`Pusher::run_stream`]: the send time of each line not yet
/// answered, oldest first (answers come in order).
#[derive(Default)]
struct Unanswered {
    sent: std::sync::Mutex<std::collections::VecDeque<Instant>>,
}

impl Pusher {
    /// [`Pusher::run`] over taskcast's push streams: the pace is the same, each push is
    /// one chunk (one write) of a long request, and each answer line is timed.
    async fn run_stream(
        &self,
        addr: SocketAddr,
        rate: f64,
        duration: Duration,
        phase: usize,
    ) -> Pushed {
        use tokio::io::AsyncWriteExt;
        let scheduled = (rate * duration.as_secs_f64()).round() as u64;
        let ack = Arc::new(Histogram::default());
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut writers = Vec::with_capacity(TCP_PUSH_CONNECTIONS);
        let mut readers = Vec::with_capacity(TCP_PUSH_CONNECTIONS);
        let auth = self.target.authorization.as_deref().unwrap_or_default();
        let Some(streams) = connect_pushers(addr).await else {
            return Pushed::none_sent(scheduled);
        };
        for stream in streams {
            let (read, mut write) = stream.into_split();
            let head = format!(
                "POST /api/progress/stream HTTP/1.1\r\nhost: taskcast\r\nauthorization: {auth}\r\n\
                 content-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
            );
            if write.write_all(head.as_bytes()).await.is_err() {
                return Pushed::none_sent(scheduled);
            }
            let unanswered = Arc::new(Unanswered::default());
            readers.push(tokio::spawn(read_answers(
                read,
                unanswered.clone(),
                ack.clone(),
                ok.clone(),
                failed.clone(),
            )));
            writers.push((write, unanswered));
        }
        let mut pace = Pace::new(rate, duration);
        let mut issued = 0u64;
        let mut line = String::new();
        while let Some(due) = pace.due(issued).await {
            while issued < due {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let task = &self.target.urls[n % self.target.urls.len()];
                let step = (n / self.target.urls.len()) as u64;
                let body = push_body(phase, step);
                line.clear();
                // `{"task_id":"<id>",` then the push body without its opening brace.
                let len = r#"{"task_id":"","#.len() + task.len() + body.len() - 1 + 1;
                line.push_str(&format!("{len:x}\r\n{{\"task_id\":\"{task}\","));
                line.push_str(&body[1..]);
                line.push_str("\n\r\n");
                let (write, unanswered) = &mut writers[n % TCP_PUSH_CONNECTIONS];
                unanswered.sent.lock().unwrap().push_back(Instant::now());
                if write.write_all(line.as_bytes()).await.is_err() {
                    unanswered.sent.lock().unwrap().pop_back();
                }
                issued += 1;
            }
        }
        // The end of each body; the answers end once every line read is answered.
        for (write, _) in &mut writers {
            let _ = write.write_all(b"0\r\n\r\n").await;
        }
        for reader in readers {
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        }
        let answered = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        Pushed {
            scheduled,
            ok: ok.load(Ordering::Relaxed),
            failed: scheduled.saturating_sub(answered) + failed.load(Ordering::Relaxed),
            ack,
        }
    }
}

/// Reads one push stream's chunked answer, timing each line against its send time.
async fn read_answers(
    mut read: tokio::net::tcp::OwnedReadHalf,
    unanswered: Arc<Unanswered>,
    ack: Arc<Histogram>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    use tokio::io::AsyncReadExt;
    // Raw bytes read and not yet decoded; answer bytes decoded and not yet a whole line.
    let (mut raw, mut lines) = (Vec::with_capacity(64 * 1024), Vec::with_capacity(64 * 1024));
    let mut scratch = vec![0u8; 64 * 1024];
    let (mut head_done, mut ended) = (false, false);
    while !ended {
        let n = match read.read(&mut scratch).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        raw.extend_from_slice(&scratch[..n]);
        let mut at = 0;
        if !head_done {
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            if !raw.starts_with(b"HTTP/1.1 200") {
                return;
            }
            at = end + 4;
            head_done = true;
        }
        // Whole chunks only: `<size>\r\n<data>\r\n`.
        while let Some(end) = raw[at..].windows(2).position(|w| w == b"\r\n") {
            let Some(size) = std::str::from_utf8(&raw[at..at + end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            else {
                return;
            };
            if size == 0 {
                // The last chunk: count the lines this read completed, then stop.
                ended = true;
                break;
            }
            let data = at + end + 2;
            if raw.len() < data + size + 2 {
                break;
            }
            lines.extend_from_slice(&raw[data..data + size]);
            at = data + size + 2;
        }
        raw.drain(..at);
        let mut start = 0;
        while let Some(newline) = lines[start..].iter().position(|&b| b == b'\n') {
            let line = &lines[start..start + newline];
            let sent = unanswered.sent.lock().unwrap().pop_front();
            if line.starts_with(br#"{"status":200"#) {
                if let Some(sent) = sent {
                    ack.record(sent.elapsed());
                }
                ok.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            start += newline + 1;
        }
        lines.drain(..start);
    }
}
