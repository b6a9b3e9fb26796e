//! One simulated generation, and the simulated GPUs it waits for.
//!
//! A generation is created `pending` ("queued"), waits its turn for one of [`GPUS`] GPUs
//! (first come, first served), then runs [`TOTAL_STEPS`] steps with a preview every few
//! steps, uploads, and completes. Some fail part-way; some stall: they stop pushing for
//! longer than the server's stall period and then carry on, unless the server has failed
//! them by then (`TASKCAST_STALL_FAIL_SECS`), which their next push learns as a 409.
//!
//! Like a real generator, a running generation learns of a cancel request from the answer
//! to its next push (`cancel_requested_at` in the state) and then pushes `cancelled`. One
//! still waiting for a GPU pushes nothing, so it looks at its task every half second.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::{FAILURES, Rng, TOTAL_STEPS};
use crate::domain::{ProgressUpdate, TaskId};
use crate::error::Error;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::writer::Writer;

/// Simulated GPUs: this many generations run at once; the others wait `pending`.
pub(super) const GPUS: usize = 2;
/// A preview every this many steps (and one at the first step).
const PREVIEW_EVERY: u32 = 3;
/// How often a generation waiting for a GPU looks for a cancel request.
const CANCEL_LOOK: Duration = Duration::from_millis(500);

/// One simulated generation: queued, waiting for a GPU, loading, steps, uploading, completed
/// (or failed).
pub(super) struct Generation {
    pub writer: Writer,
    /// Read while waiting for a GPU, for a cancel request.
    pub store: Store,
    pub shutdown: Shutdown,
    pub task: TaskId,
    /// The result picture's URL, and the previews' URL with `{step}` to fill in.
    pub result_url: String,
    pub preview_url: String,
    pub pace: Pace,
    /// Fails at this step.
    pub fail_at: Option<u32>,
    /// Stops pushing before this step for this long.
    pub stall: Option<(u32, Duration)>,
    /// Its turn on a GPU: answered when every generation created before it has had one.
    pub gpu: oneshot::Receiver<Gpu>,
    /// The GPU once its turn came: held until the generation is dropped, after its last
    /// push, so the next one in line starts only once this one's end is committed.
    pub held: Option<Gpu>,
    pub rng: Rng,
    pub seq: i64,
    /// Holds a place of the demo's bound until the generation ends.
    pub _slot: OwnedSemaphorePermit,
}

/// How long a simulated generation takes: pauses in milliseconds, before a per-generation
/// speed factor.
#[derive(Clone, Copy)]
pub(super) struct Pace {
    load_ms: (u64, u64),
    step_ms: (u64, u64),
    upload_ms: (u64, u64),
}

impl Pace {
    /// About 20 s on a GPU: slow enough to restart the server mid-generation and watch it
    /// carry on.
    pub const NORMAL: Pace = Pace {
        load_ms: (800, 1_500),
        step_ms: (450, 700),
        upload_ms: (800, 1_500),
    };
    /// About 3 s on a GPU, for tests.
    pub const FAST: Pace = Pace {
        load_ms: (100, 200),
        step_ms: (70, 110),
        upload_ms: (150, 300),
    };
}

/// Why a generation stops early.
enum Stop {
    Shutdown,
    Finished,
    /// A subscriber asked to cancel: push `cancelled` and stop.
    Cancelled,
}

impl Generation {
    pub async fn run(mut self) {
        if let Err(Stop::Cancelled) = self.steps().await {
            // A 409 here means it ended meanwhile (completed, or failed by the server).
            let cancelled = json!({"status": "cancelled", "stage": "cancelled"});
            let _ = self.push(cancelled).await;
        }
    }

    async fn steps(&mut self) -> Result<(), Stop> {
        let queued = json!({"status": "pending", "stage": "queued", "progress": 0,
            "step": 0, "total_steps": TOTAL_STEPS});
        self.push(queued).await?;
        let mut look = tokio::time::interval(CANCEL_LOOK);
        let gpu = loop {
            tokio::select! {
                gpu = &mut self.gpu => break gpu.map_err(|_| Stop::Shutdown)?,
                _ = self.shutdown.wait() => return Err(Stop::Shutdown),
                _ = look.tick() => {
                    if let Ok(Some(state)) = self.store.get(self.task).await
                        && state.cancel_requested_at.is_some()
                    {
                        return Err(Stop::Cancelled);
                    }
                }
            }
        };
        self.held = Some(gpu);
        // Some GPUs are faster than others, and some prompts harder: ±25 %.
        let speed = 75 + self.rng.below(51);
        self.push(json!({"status": "processing", "stage": "loading model"}))
            .await?;
        let pace = self.pace;
        self.pause(pace.load_ms, speed).await?;
        for step in 1..=TOTAL_STEPS {
            self.pause(pace.step_ms, speed).await?;
            if let Some((at, stall)) = self.stall
                && at == step
            {
                // The generator hangs (a stuck driver, a lost worker): no pushes at all.
                self.sleep(stall).await?;
            }
            // With both step counts, progress follows from them.
            let mut update = json!({"status": "processing", "stage": "generating",
                "step": step, "total_steps": TOTAL_STEPS});
            if step == 1 || step % PREVIEW_EVERY == 0 {
                update["preview_url"] =
                    self.preview_url.replace("{step}", &step.to_string()).into();
            }
            self.push(update).await?;
            if self.fail_at == Some(step) {
                let error = FAILURES[self.rng.below(FAILURES.len() as u64) as usize];
                return self.push(json!({"status": "failed", "error": error})).await;
            }
        }
        self.push(json!({"stage": "uploading"})).await?;
        self.pause(pace.upload_ms, speed).await?;
        let done = json!({"status": "completed", "stage": "done", "image_url": self.result_url});
        self.push(done).await
    }

    /// A failed push is logged and the generation goes on, as the guide asks of real
    /// generators; only a finished task (someone else ended it) stops it.
    async fn push(&mut self, mut fields: serde_json::Value) -> Result<(), Stop> {
        self.seq += 1;
        fields["seq"] = self.seq.into();
        let update = ProgressUpdate::from_json(fields.to_string().as_bytes())
            .expect("the demo's updates are valid");
        match self.writer.push(self.task, update).await {
            Ok(outcome) if outcome.state().cancel_requested_at.is_some() => Err(Stop::Cancelled),
            Ok(_) => Ok(()),
            Err(Error::Conflict { .. }) => Err(Stop::Finished),
            Err(_) if self.shutdown.is_triggered() => Err(Stop::Shutdown),
            Err(e) => {
                tracing::warn!(task = %self.task, error = %e.chain(), "demo push failed");
                Ok(())
            }
        }
    }

    /// A random pause in `min_ms..=max_ms`, times `speed` percent.
    async fn pause(&mut self, (min_ms, max_ms): (u64, u64), speed: u64) -> Result<(), Stop> {
        let ms = min_ms + self.rng.below(max_ms - min_ms + 1);
        self.sleep(Duration::from_millis(ms * speed / 100)).await
    }

    async fn sleep(&self, wait: Duration) -> Result<(), Stop> {
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            _ = self.shutdown.wait() => Err(Stop::Shutdown),
        }
    }
}

/// The simulated GPUs: at most `count` generations hold one; the others wait in the order
/// they joined the line. Cloning the `Arc` is how generations share them.
pub(super) struct Gpus {
    /// std Mutex, not tokio: nothing awaits while it is held.
    line: Mutex<Line>,
}

struct Line {
    free: usize,
    waiting: VecDeque<oneshot::Sender<Gpu>>,
}

/// One GPU, held until dropped; the drop hands it to the next in line.
pub(super) struct Gpu {
    gpus: Arc<Gpus>,
}

impl Gpus {
    pub fn new(count: usize) -> Arc<Self> {
        Arc::new(Gpus {
            line: Mutex::new(Line {
                free: count,
                waiting: VecDeque::new(),
            }),
        })
    }

    /// Joins the line at once (not when first polled, as a semaphore's `acquire` would), so
    /// the order of the calls is the order of the turns.
    pub fn join(self: &Arc<Self>) -> oneshot::Receiver<Gpu> {
        let (turn, receiver) = oneshot::channel();
        let mut line = self.line.lock().unwrap_or_else(PoisonError::into_inner);
        if line.free > 0 {
            line.free -= 1;
            drop(line);
            let _ = turn.send(Gpu {
                gpus: Arc::clone(self),
            });
        } else {
            line.waiting.push_back(turn);
        }
        receiver
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let next = {
            let mut line = self
                .gpus
                .line
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match line.waiting.pop_front() {
                Some(next) => next,
                None => {
                    line.free += 1;
                    return;
                }
            }
        };
        // A waiter that is gone (its generation stopped) hands the GPU back, and dropping
        // it here passes it on to the one after: recursion at most as deep as the line.
        let _ = next.send(Gpu {
            gpus: Arc::clone(&self.gpus),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_go_to_the_line_in_order_and_skip_those_who_left() {
        let gpus = Gpus::new(2);
        let mut turns: Vec<_> = (0..5).map(|_| gpus.join()).collect();
        let first = turns[0].try_recv().expect("a free GPU at once");
        let second = turns[1].try_recv().expect("a second free GPU at once");
        assert!(turns[2].try_recv().is_err(), "the third waits");
        drop(first);
        let third = turns[2].try_recv().expect("the third gets the first's GPU");
        assert!(turns[3].try_recv().is_err(), "the fourth still waits");
        // The fourth gives up (its generation stopped): the fifth is next.
        drop(turns.remove(3));
        drop(second);
        let fifth = turns[3]
            .try_recv()
            .expect("the fifth gets the second's GPU");
        drop((third, fifth));
        assert_eq!(gpus.line.lock().unwrap().free, 2, "every GPU came back");
    }
}
