//! The waiting updates: one per task (latest wins), in the order their tasks started
//! waiting, and the tasks with a request in flight. Everything here runs under one lock
//! and never awaits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use taskcast_wire::TaskId;

use crate::{Stats, Update};

/// The JSON body of one push: an update and its `seq`.
#[derive(Debug, Serialize)]
pub(crate) struct Pending {
    #[serde(flatten)]
    pub update: Update,
    pub seq: i64,
}

impl Pending {
    pub fn new(update: Update) -> Self {
        Pending {
            update,
            seq: next_seq(),
        }
    }
}

/// Process-wide, so two reporters in one process never share a `seq`; it follows the clock
/// in microseconds, so a restarted generator still sends numbers above its earlier ones.
static LAST_SEQ: AtomicI64 = AtomicI64::new(0);

fn next_seq() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    let now = since_epoch.map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2));
    let bump = |last: i64| last.saturating_add(1).max(now);
    let last = LAST_SEQ.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(bump(l)));
    bump(last.unwrap_or_else(|l| l))
}

/// All that changes, under one lock: task → latest waiting update, the order in which
/// tasks wait, the tasks with a request in flight, and the counts.
#[derive(Default)]
pub(crate) struct Queue {
    pub waiting: HashMap<TaskId, Pending>,
    pub order: VecDeque<TaskId>,
    pub in_flight: HashSet<TaskId>,
    pub stats: Stats,
    /// `dropped + failed` when the previous `flush` returned.
    pub lost_at_flush: u64,
    pub closed: bool,
    /// Tasks whose push answer said `cancel_requested: true`; a task leaves when a final
    /// update is reported for it, so the set stays as small as the cancels in flight.
    pub cancel_requested: HashSet<TaskId>,
}

impl Queue {
    /// Queues `new`, merged into what waits for its task. Returns the task whose update
    /// was dropped to stay within `capacity`.
    pub fn push(&mut self, task: TaskId, new: Pending, capacity: usize) -> Option<TaskId> {
        if let Some(waiting) = self.waiting.get_mut(&task) {
            let older = std::mem::replace(waiting, new);
            waiting.update.fill_from(older.update);
            self.stats.conflated += 1;
            return None;
        }
        let mut dropped = None;
        if self.waiting.len() >= capacity {
            self.stats.dropped += 1;
            // A final update (completed, failed) goes only if every waiting one is final.
            let not_final = |t: &TaskId| !self.waiting[t].update.is_final();
            let victim = match self.order.iter().position(not_final) {
                Some(i) => i,
                None if new.update.is_final() => 0,
                None => return Some(task),
            };
            let victim = self.order.remove(victim).expect("position is in range");
            self.waiting.remove(&victim);
            dropped = Some(victim);
        }
        self.waiting.insert(task, new);
        self.order.push_back(task);
        self.stats.peak_pending = self.stats.peak_pending.max(self.waiting.len());
        dropped
    }

    /// The oldest waiting updates whose tasks have no request in flight, at most
    /// `max_items` and, past the first, at most `max_bytes` of JSON in all (see
    /// [`Update::json_bound`]); their tasks are in flight from now on.
    pub fn take_batch(&mut self, max_items: usize, max_bytes: usize) -> Vec<(TaskId, Pending)> {
        let mut taken = Vec::new();
        let mut bytes = 0;
        let mut index = 0;
        while index < self.order.len() && taken.len() < max_items {
            let task = self.order[index];
            if self.in_flight.contains(&task) {
                index += 1;
                continue;
            }
            let size = self.waiting[&task].update.json_bound();
            if !taken.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            self.order.remove(index).expect("index is in range");
            self.in_flight.insert(task);
            let pending = self.waiting.remove(&task).expect("order mirrors waiting");
            taken.push((task, pending));
        }
        taken
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(update: Update) -> Pending {
        Pending::new(update)
    }

    #[test]
    fn a_newer_update_wins_and_keeps_the_fields_it_leaves_unset() {
        let (mut queue, task) = (Queue::default(), TaskId::random());
        queue.push(task, pending(Update::new().stage("uploading")), 1);
        let first_seq = queue.waiting[&task].seq;
        queue.push(task, pending(Update::new().progress(250.0)), 1);
        let mut taken = queue.take_batch(10, usize::MAX);
        let (_, merged) = taken.pop().expect("one waiting");
        assert_eq!(
            merged.update,
            Update::new().stage("uploading").progress(100.0)
        );
        assert!(merged.seq > first_seq);
        assert_eq!(queue.stats.conflated, 1);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_update_that_is_not_final() {
        let mut queue = Queue::default();
        let [a, b, c, d] = [(); 4].map(|()| TaskId::random());
        assert_eq!(
            queue.push(a, pending(Update::completed("https://x.io/a.png")), 2),
            None
        );
        assert_eq!(queue.push(b, pending(Update::new().progress(1.0)), 2), None);
        assert_eq!(
            queue.push(c, pending(Update::new().progress(2.0)), 2),
            Some(b)
        );
        assert_eq!(
            queue.push(d, pending(Update::new().progress(3.0)), 2),
            Some(c)
        );
        assert!(queue.waiting.contains_key(&a), "the final update survives");
        assert_eq!((queue.waiting.len(), queue.stats.peak_pending), (2, 2));
        assert_eq!(queue.stats.dropped, 2);
    }

    #[test]
    fn a_batch_takes_the_oldest_tasks_not_in_flight_up_to_its_item_and_byte_caps() {
        let mut queue = Queue::default();
        let tasks: Vec<TaskId> = (0..5).map(|_| TaskId::random()).collect();
        for (i, task) in tasks.iter().enumerate() {
            queue.push(*task, pending(Update::new().progress(i as f64)), 10);
        }
        let first: Vec<TaskId> = queue
            .take_batch(2, usize::MAX)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(first, tasks[..2]);
        // A newer update for a task in flight waits until its request is over.
        queue.push(tasks[0], pending(Update::new().progress(50.0)), 10);
        let rest: Vec<TaskId> = queue
            .take_batch(10, usize::MAX)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(rest, tasks[2..]);
        assert!(queue.take_batch(10, usize::MAX).is_empty());
        queue.in_flight.remove(&tasks[0]);
        assert_eq!(queue.take_batch(10, usize::MAX)[0].0, tasks[0]);

        // The byte cap: always one item, then only what fits.
        let big = "x".repeat(1000);
        for task in &tasks[1..] {
            queue.in_flight.remove(task);
            queue.push(*task, pending(Update::new().image_url(&big)), 10);
        }
        let one = Update::new().image_url(&big).json_bound();
        assert_eq!(queue.take_batch(10, 1).len(), 1);
        assert_eq!(queue.take_batch(10, 2 * one).len(), 2);
        assert_eq!(queue.waiting.len(), 1);
    }
}
