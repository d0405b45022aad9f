//! Micro-batching of query embeddings: image queries of one model version that arrive together
//! share one forward pass (on a GPU one pass of 32 images costs little more than one of 1).
//!
//! Each request decodes and resizes its own image on its own thread, then hands it to the
//! version's batching thread and waits. That thread takes every image already queued and,
//! while it has fewer than `max_batch`, waits at most `max_wait` for more, so a lone query is
//! delayed by at most `max_wait` and queries that pile up behind a running pass go together in
//! the next.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use crate::encoder::{Encoder, EncoderError, PreparedImage};

use super::metrics::Metrics;

/// How query embeddings are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most images in one forward pass; 1 turns batching off.
    pub max_batch: usize,
    /// Longest the first query of a batch waits for others.
    pub max_wait: Duration,
}

impl BatchPolicy {
    /// No batching: every query runs its own forward pass on its own thread.
    pub const OFF: BatchPolicy = BatchPolicy { max_batch: 1, max_wait: Duration::ZERO };

    /// The default for `device`: batches of up to 32 images within 2 ms on a GPU, off on the
    /// CPU (where one forward pass already uses every core).
    pub fn for_device(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::OFF
        } else {
            BatchPolicy { max_batch: 32, max_wait: Duration::from_millis(2) }
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_batch > 1
    }
}

type Reply = Result<Vec<f32>, EncoderError>;

/// Why a batched embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("the batching thread of model {0} has stopped")]
    Stopped(String),
}

struct Job {
    image: PreparedImage,
    reply: SyncSender<Reply>,
}

/// The batching thread of one model version; dropping it ends the thread once its queue is
/// empty.
pub struct QueryBatcher {
    queue: SyncSender<Job>,
    version: String,
}

impl QueryBatcher {
    /// Starts the batching thread for `encoder`.
    pub fn start(encoder: Arc<Encoder>, policy: BatchPolicy, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        // Deep enough that senders never wait while a pass runs: admission bounds the callers.
        let (queue, jobs) = mpsc::sync_channel(policy.max_batch.max(1) * 64);
        let version = encoder.version().to_string();
        std::thread::Builder::new()
            .name(format!("vitrine-batch-{}", encoder.version()))
            .spawn(move || run(&encoder, &jobs, policy, &metrics))?;
        Ok(QueryBatcher { queue, version })
    }

    /// Embeds `image` in the next batch and waits for its L2-normalised vector (blocking: call
    /// from a blocking thread).
    pub fn embed(&self, image: PreparedImage) -> Result<Vec<f32>, BatchError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let stopped = || BatchError::Stopped(self.version.clone());
        self.queue.send(Job { image, reply }).map_err(|_| stopped())?;
        Ok(answer.recv().map_err(|_| stopped())??)
    }
}

/// Collects a batch: the first job, everything already queued, then more until `max_batch` or
/// `max_wait` after the first arrived. `None` when the queue is closed.
fn collect<T>(jobs: &Receiver<T>, policy: BatchPolicy) -> Option<Vec<T>> {
    let first = jobs.recv().ok()?;
    let deadline = Instant::now() + policy.max_wait;
    let mut batch = vec![first];
    while batch.len() < policy.max_batch {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match jobs.recv_timeout(left) {
                    Ok(job) => batch.push(job),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
    }
    Some(batch)
}

fn run(encoder: &Encoder, jobs: &Receiver<Job>, policy: BatchPolicy, metrics: &Metrics) {
    while let Some(batch) = collect(jobs, policy) {
        let started = Instant::now();
        let (images, replies): (Vec<PreparedImage>, Vec<SyncSender<Reply>>) =
            batch.into_iter().map(|j| (j.image, j.reply)).unzip();
        // One bad image (an all-zero embedding) fails alone, not its batch.
        let vectors = encoder.embed_each(&images);
        metrics.record_encode(encoder.version().as_str(), images.len(), started.elapsed());
        for (reply, v) in replies.into_iter().zip(vectors) {
            // A caller that gave up (its request was cancelled) no longer listens.
            let _ = reply.send(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_what_is_queued_up_to_the_limit() {
        let (tx, rx) = mpsc::sync_channel(16);
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        let policy = BatchPolicy { max_batch: 3, max_wait: Duration::from_secs(60) };
        assert_eq!(collect(&rx, policy).unwrap(), vec![0, 1, 2], "full at max_batch, no waiting");
        let policy = BatchPolicy { max_batch: 8, max_wait: Duration::ZERO };
        assert_eq!(collect(&rx, policy).unwrap(), vec![3, 4], "the rest, without waiting for more");
        drop(tx);
        assert!(collect(&rx, policy).is_none(), "closed and empty");
    }

    #[test]
    fn a_lone_query_waits_at_most_max_wait() {
        let (tx, rx) = mpsc::sync_channel(16);
        tx.send(1).unwrap();
        let policy = BatchPolicy { max_batch: 8, max_wait: Duration::from_millis(30) };
        let started = Instant::now();
        assert_eq!(collect(&rx, policy).unwrap(), vec![1]);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(30), "returned after {waited:?}");
    }

    #[test]
    fn a_query_arriving_within_the_window_joins_the_batch() {
        let (tx, rx) = mpsc::sync_channel(16);
        tx.send(1).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(2).unwrap();
            tx
        });
        // Full at two, so it returns as soon as the second arrives.
        let policy = BatchPolicy { max_batch: 2, max_wait: Duration::from_secs(60) };
        assert_eq!(collect(&rx, policy).unwrap(), vec![1, 2]);
        drop(late.join().unwrap());
    }

    #[test]
    fn policy_defaults_off_on_the_cpu() {
        assert_eq!(BatchPolicy::for_device(&candle_core::Device::Cpu), BatchPolicy::OFF);
        assert!(!BatchPolicy::OFF.enabled());
    }
}
