//! The writer: one task that commits pushes in groups.
//!
//! Pushes that arrive while a commit is in flight form the next batch, so under load one
//! transaction carries many pushes, and when idle a push is committed at once. Commits
//! start at most once per `commit_interval` (TASKCAST_COMMIT_INTERVAL_MS): a push that
//! finds the writer idle for longer is committed at once, while under load the pushes of
//! one interval share a commit, which is what a commit costs Postgres (a WAL flush each).
//! Every pusher is answered only after its batch has committed; a 2xx therefore means
//! durable. Applied states are then handed to the hub, which fans them out.
//!
//! The in-memory store has nothing to group (its apply takes a lock and never awaits), so
//! its pushes are applied in the caller's task, without the hop to the writer task.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::domain::{Outcome, ProgressUpdate, TaskId};
use crate::error::Error;
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::telemetry;

mod commits;
pub use commits::{CommitInFlight, LocalCommits};

struct Job {
    task: TaskId,
    update: ProgressUpdate,
    reply: oneshot::Sender<Result<Outcome, Error>>,
    queued: Instant,
}

/// How pushes reach the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteMode {
    /// One writer task; pushes that arrive during a commit share the next one.
    Group,
    /// Each push commits on its own pool connection: one UPDATE per push. A baseline for
    /// benchmarks, not for production.
    Naive,
}

/// How the writer groups pushes (from `Limits`).
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    pub mode: WriteMode,
    /// Most pushes in one commit (TASKCAST_MAX_BATCH).
    pub max_batch: usize,
    /// Pushes waiting; more are refused with 503 (TASKCAST_WRITER_QUEUE).
    pub queue: usize,
    /// Least time from one commit's start to the next (TASKCAST_COMMIT_INTERVAL_MS).
    pub commit_interval: Duration,
}

/// A handle for submitting pushes. Cloning is shallow (an mpsc sender).
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    mode: WriteMode,
    store: Store,
    hub: Hub,
    commits: LocalCommits,
}

impl Writer {
    /// Starts the writer task. It ends once every `Writer` handle is dropped, or after
    /// shutdown, with the queue drained either way: every accepted push is answered.
    /// Once `shutdown` is triggered the queue closes: later pushes get 503, queued ones are
    /// still committed and answered, then the task ends.
    pub fn spawn(
        store: Store,
        hub: Hub,
        options: WriterOptions,
        shutdown: Shutdown,
    ) -> (Writer, JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(options.queue);
        let commits = LocalCommits::default();
        let task = tokio::spawn(run(
            store.clone(),
            hub.clone(),
            commits.clone(),
            rx,
            options,
            shutdown,
        ));
        let writer = Writer {
            jobs,
            mode: options.mode,
            store,
            hub,
            commits,
        };
        (writer, task)
    }

    /// This node's commits in flight (for the NOTIFY listener).
    pub fn commits(&self) -> LocalCommits {
        self.commits.clone()
    }

    /// Commits a push and returns its outcome. In group mode a full queue is refused at
    /// once with 503 rather than letting requests pile up; the in-memory store applies it
    /// here (see [`Writer::apply_in_memory`]).
    pub async fn push(&self, task: TaskId, update: ProgressUpdate) -> Result<Outcome, Error> {
        if let Store::Memory(memory) = &self.store {
            return self.apply_in_memory(memory, task, update);
        }
        match self.mode {
            WriteMode::Group => self.enqueue(task, update)?.await,
            // On its own task, as the writer's commits are: a cancelled request cannot cut
            // a commit short between its UPDATE and its publish (or its re-read when quiet).
            WriteMode::Naive => {
                Submitted::Spawned(tokio::spawn(self.clone().commit_alone(task, update))).await
            }
        }
    }

    /// Naive mode's commit: one UPDATE on its own pool connection, then the publish.
    async fn commit_alone(self, task: TaskId, update: ProgressUpdate) -> Result<Outcome, Error> {
        let _commit = self.commits.start();
        let mut results = self
            .store
            .apply_batch(&[(task, update)], Instant::now())
            .await?;
        let result = results.pop().expect("one result per push");
        if let Ok(Outcome::Applied(state)) = &result {
            self.hub.publish(state);
        }
        result
    }

    /// Whether pushes submitted one after another commit in that order. Naive mode's
    /// commits run concurrently: a caller that needs the order awaits each answer first.
    pub fn keeps_order(&self) -> bool {
        self.mode == WriteMode::Group || matches!(self.store, Store::Memory(_))
    }

    /// Commits several pushes, in order; each gets its own result. In group mode they
    /// are queued together, so they share commits with each other and with other pushes.
    pub async fn push_many(
        &self,
        pushes: Vec<(TaskId, ProgressUpdate)>,
    ) -> Vec<Result<Outcome, Error>> {
        if let Store::Memory(memory) = &self.store {
            return pushes
                .into_iter()
                .map(|(task, update)| self.apply_in_memory(memory, task, update))
                .collect();
        }
        match self.mode {
            WriteMode::Group => {
                let pending: Vec<_> = pushes
                    .into_iter()
                    .map(|(task, update)| self.enqueue(task, update))
                    .collect();
                let mut results = Vec::with_capacity(pending.len());
                for answer in pending {
                    results.push(match answer {
                        Ok(answer) => answer.await,
                        Err(e) => Err(e),
                    });
                }
                results
            }
            WriteMode::Naive => {
                let mut results = Vec::with_capacity(pushes.len());
                for (task, update) in pushes {
                    results.push(self.push(task, update).await);
                }
                results
            }
        }
    }

    /// The in-memory store commits in the caller's task: its apply takes a lock and never
    /// awaits, so there is nothing to group and nothing a cancelled request could cut short,
    /// and skipping the hop to the writer task saves two task wake-ups per push. After
    /// shutdown it refuses like the queue does.
    fn apply_in_memory(
        &self,
        memory: &crate::store::MemoryStore,
        task: TaskId,
        update: ProgressUpdate,
    ) -> Result<Outcome, Error> {
        if self.jobs.is_closed() {
            return Err(Error::Unavailable {
                what: "the writer (shutting down)",
                source: None,
            });
        }
        let started = Instant::now();
        let result = memory
            .apply_batch(&[(task, update)])
            .pop()
            .expect("one result per push");
        let hot = telemetry::hot();
        hot.batch_size.record(1.0);
        hot.commit_seconds.record(started.elapsed().as_secs_f64());
        if let Ok(Outcome::Applied(state)) = &result {
            self.hub.publish(state);
            hot.fanout_seconds.record(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Starts a push now and returns its answer to await later, owning nothing borrowed:
    /// for a caller that keeps many in flight (the push stream). The push is queued (or
    /// applied, in memory) before this returns, so pushes submitted one after another
    /// keep their order, except in naive mode (see [`Writer::keeps_order`]); dropping the
    /// answer does not cancel the commit.
    pub fn submit(&self, task: TaskId, update: ProgressUpdate) -> Submitted {
        if let Store::Memory(memory) = &self.store {
            return Submitted::done(self.apply_in_memory(memory, task, update));
        }
        match self.mode {
            WriteMode::Group => match self.send_job(task, update) {
                Ok(answer) => Submitted::Queued(answer),
                Err(e) => Submitted::done(Err(e)),
            },
            WriteMode::Naive => {
                Submitted::Spawned(tokio::spawn(self.clone().commit_alone(task, update)))
            }
        }
    }

    fn enqueue(
        &self,
        task: TaskId,
        update: ProgressUpdate,
    ) -> Result<impl Future<Output = Result<Outcome, Error>> + use<>, Error> {
        let answer = self.send_job(task, update)?;
        Ok(async move {
            answer
                .await
                .map_err(|_| Error::internal("waiting for the commit", "the writer stopped"))?
        })
    }

    fn send_job(
        &self,
        task: TaskId,
        update: ProgressUpdate,
    ) -> Result<oneshot::Receiver<Result<Outcome, Error>>, Error> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            task,
            update,
            reply,
            queued: Instant::now(),
        };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Unavailable {
                what: "the push queue (TASKCAST_WRITER_QUEUE is full)",
                source: None,
            },
            mpsc::error::TrySendError::Closed(_) => Error::Unavailable {
                what: "the writer (shutting down)",
                source: None,
            },
        })?;
        Ok(answer)
    }
}

/// A push's answer from [`Writer::submit`]. Every form is `Send + Sync + Unpin`, so a
/// stream can hold a queue of them.
pub enum Submitted {
    /// Answered already (in memory, or refused); `None` once taken. Boxed: a stream
    /// holds up to TASKCAST_MAX_BATCH_ITEMS of these, mostly the small ones.
    Done(Option<Box<Result<Outcome, Error>>>),
    /// In the writer's queue.
    Queued(oneshot::Receiver<Result<Outcome, Error>>),
    /// Committing on its own (naive mode).
    Spawned(JoinHandle<Result<Outcome, Error>>),
}

impl Submitted {
    /// An answer known already.
    pub fn done(answer: Result<Outcome, Error>) -> Self {
        Submitted::Done(Some(Box::new(answer)))
    }
}

impl Future for Submitted {
    type Output = Result<Outcome, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        match &mut *self {
            Submitted::Done(answer) => Poll::Ready(match answer.take() {
                Some(answer) => *answer,
                None => Err(Error::internal(
                    "a push's answer",
                    "polled after it was taken",
                )),
            }),
            Submitted::Queued(answer) => std::pin::Pin::new(answer).poll(cx).map(|answer| {
                answer
                    .map_err(|_| Error::internal("waiting for the commit", "the writer stopped"))?
            }),
            Submitted::Spawned(task) => std::pin::Pin::new(task).poll(cx).map(|joined| {
                joined.map_err(|e| Error::internal("committing a push", e.to_string()))?
            }),
        }
    }
}

async fn run(
    store: Store,
    hub: Hub,
    commits: LocalCommits,
    mut rx: mpsc::Receiver<Job>,
    options: WriterOptions,
    shutdown: Shutdown,
) {
    let max_batch = options.max_batch;
    // Jobs received but not yet committed. Holds at most `max_batch` jobs.
    let mut pending: VecDeque<Job> = VecDeque::with_capacity(max_batch);
    let mut closed = false;
    // When the last commit started: the next starts `commit_interval` after it at the
    // earliest, gathering what arrives until then.
    let mut last_commit: Option<Instant> = None;
    loop {
        if pending.is_empty() {
            let next = tokio::select! {
                job = rx.recv() => job,
                _ = shutdown.wait(), if !closed => {
                    // Refuse new pushes (503), but commit and answer every queued one.
                    rx.close();
                    closed = true;
                    continue;
                }
            };
            match next {
                Some(job) => pending.push_back(job),
                None => return,
            }
        }
        if let Some(last) = last_commit {
            gather_until(
                &mut rx,
                &mut pending,
                max_batch,
                last + options.commit_interval,
            )
            .await;
        }
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => break,
            }
        }
        let batch = take_batch(&mut pending);
        last_commit = Some(Instant::now());
        commit(&store, &hub, &commits, batch).await;
    }
}

/// Receives jobs until `until` or until `max_batch` wait. Returns at once when `until` has
/// passed: a push after a quiet spell is not delayed. A closed queue ends the wait too
/// (the jobs in hand are still committed).
async fn gather_until(
    rx: &mut mpsc::Receiver<Job>,
    pending: &mut VecDeque<Job>,
    max_batch: usize,
    until: Instant,
) {
    while pending.len() < max_batch && Instant::now() < until {
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => pending.push_back(job),
                None => return,
            },
            () = tokio::time::sleep_until(until) => return,
        }
    }
}

/// Takes the oldest job of each task: one statement updates a row at most once, so a
/// second push to the same task waits for the next batch, keeping per-task order.
fn take_batch(pending: &mut VecDeque<Job>) -> Vec<Job> {
    let mut seen = HashSet::with_capacity(pending.len());
    let mut batch = Vec::with_capacity(pending.len());
    let mut rest = VecDeque::new();
    for job in pending.drain(..) {
        if seen.insert(job.task) {
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *pending = rest;
    batch
}

async fn commit(store: &Store, hub: &Hub, commits: &LocalCommits, batch: Vec<Job>) {
    let mut items = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    // Each pusher is due an answer one database timeout after it queued.
    let since = batch.iter().map(|job| job.queued).min();
    for job in batch {
        items.push((job.task, job.update));
        waiting.push((job.reply, job.queued));
    }
    let hot = telemetry::hot();
    hot.batch_size.record(items.len() as f64);
    // Until every applied state below is published.
    let _commit = commits.start();
    let started = Instant::now();
    let committed = store
        .apply_batch(&items, since.unwrap_or_else(Instant::now))
        .await;
    hot.commit_seconds.record(started.elapsed().as_secs_f64());
    match committed {
        Ok(results) => {
            for (result, (reply, queued)) in results.into_iter().zip(waiting) {
                if let Ok(Outcome::Applied(state)) = &result {
                    hub.publish(state);
                    hot.fanout_seconds.record(queued.elapsed().as_secs_f64());
                }
                // The pusher may have gone; the commit stands and a retry with the same
                // seq is answered `applied: false`.
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            tracing::warn!(error = %error.chain(), pushes = waiting.len(), "batch not committed");
            for (reply, _) in waiting {
                let _ = reply.send(Err(error.for_each_push()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NewTask;
    use crate::store::MemoryStore;

    const INTERVAL: Duration = Duration::from_millis(50);

    fn writer() -> (Writer, MemoryStore) {
        let memory = MemoryStore::new();
        let options = WriterOptions {
            mode: WriteMode::Group,
            max_batch: 100,
            queue: 100,
            commit_interval: INTERVAL,
        };
        let store = Store::Memory(memory.clone());
        let (writer, _task) = Writer::spawn(store, Hub::new(), options, Shutdown::new());
        (writer, memory)
    }

    fn task(memory: &MemoryStore) -> TaskId {
        let new = NewTask {
            prompt: None,
            user_id: None,
        };
        memory.create(new).expect("created").task_id
    }

    /// Queues a push through the writer task (the in-memory store's own `push` skips it)
    /// and returns when its commit answered, measured on the paused clock.
    async fn pushed_at(writer: &Writer, task: TaskId, started: Instant) -> Duration {
        let update = ProgressUpdate::from_json(br#"{"progress": 10}"#).expect("valid");
        let answer = writer.enqueue(task, update).expect("queued");
        answer.await.expect("committed");
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_after_a_quiet_spell_is_committed_at_once() {
        let (writer, memory) = writer();
        let started = Instant::now();
        assert_eq!(
            pushed_at(&writer, task(&memory), started).await,
            Duration::ZERO
        );
        tokio::time::sleep(INTERVAL * 3).await;
        let again = Instant::now();
        assert_eq!(
            pushed_at(&writer, task(&memory), again).await,
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pushes_within_one_interval_share_the_next_commit() {
        let (writer, memory) = writer();
        let started = Instant::now();
        pushed_at(&writer, task(&memory), started).await;
        // Two pushes 10 ms and 20 ms after the first commit started: both wait for the
        // interval to end and go out in one commit, at 50 ms.
        let (a, b) = (task(&memory), task(&memory));
        let first = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            pushed_at(&writer, a, started).await
        };
        let second = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pushed_at(&writer, b, started).await
        };
        let (first, second) = tokio::join!(first, second);
        assert_eq!((first, second), (INTERVAL, INTERVAL));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_does_not_wait_for_the_interval() {
        let memory = MemoryStore::new();
        let options = WriterOptions {
            mode: WriteMode::Group,
            max_batch: 2,
            queue: 100,
            commit_interval: INTERVAL,
        };
        let store = Store::Memory(memory.clone());
        let (writer, _task) = Writer::spawn(store, Hub::new(), options, Shutdown::new());
        let started = Instant::now();
        pushed_at(&writer, task(&memory), started).await;
        let (a, b) = (task(&memory), task(&memory));
        let (first, second) = tokio::join!(
            pushed_at(&writer, a, started),
            pushed_at(&writer, b, started)
        );
        assert_eq!((first, second), (Duration::ZERO, Duration::ZERO));
    }
}
