//! Admission control: bounded concurrency per kind of work (image embedding, index search,
//! writes), each with a bounded queue and a bounded wait. A request past either bound is shed
//! at once with `RESOURCE_EXHAUSTED` (and counted) instead of queueing without limit, so a
//! spike costs the requests that cannot be served in time, not the server's memory or the
//! latency of those it admits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ServiceError;

/// The kinds of work that are limited separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Decoding and embedding images (image queries, image upserts, backfill).
    Embed,
    /// Searching the index with a vector (vector and SKU queries).
    Search,
    /// Write requests (upsert, stream chunks, delete).
    Write,
}

impl Work {
    fn name(self) -> &'static str {
        match self {
            Work::Embed => "image embedding",
            Work::Search => "search",
            Work::Write => "write",
        }
    }
}

/// Limits of one kind of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests running at once.
    pub running: usize,
    /// Requests waiting for a slot at once; one more is shed without waiting.
    pub queued: usize,
}

/// Admission settings of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionConfig {
    pub embed: Limit,
    pub search: Limit,
    pub write: Limit,
    /// Longest a queued request waits for a slot before it is shed.
    pub max_wait: Duration,
}

impl Default for AdmissionConfig {
    /// Embeds: 1 at once (one embedding already uses every core; two at once only take
    /// turns on them), 1 waiting. Searches: one per core, 64 waiting. Writes: 64 at once (the
    /// writer batches them into one fsync), 1024 waiting. A queued request waits at most
    /// 50 ms. The embed queue is as deep as the slots: an admitted image query waits at most
    /// about one embedding before it runs, which keeps its p99 under twice the unloaded one
    /// however large the spike (measured with examples/loadgen: 1.36x under a 20x spike).
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        AdmissionConfig {
            embed: Limit { running: 1, queued: 1 },
            search: Limit { running: cores, queued: 64 },
            write: Limit { running: 64, queued: 1024 },
            max_wait: Duration::from_millis(50),
        }
    }
}

impl AdmissionConfig {
    /// Rejects limits that would admit nothing.
    pub fn validate(&self) -> Result<(), String> {
        for (work, l) in [(Work::Embed, self.embed), (Work::Search, self.search), (Work::Write, self.write)] {
            if l.running == 0 {
                return Err(format!("{} concurrency must be at least 1", work.name()));
            }
        }
        Ok(())
    }
}

struct Gate {
    slots: Arc<Semaphore>,
    limit: Limit,
    waiting: AtomicUsize,
    shed: AtomicU64,
}

impl Gate {
    fn new(limit: Limit) -> Self {
        Gate {
            slots: Arc::new(Semaphore::new(limit.running.max(1))),
            limit,
            waiting: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
        }
    }

    fn shed(&self, why: &str) -> ServiceError {
        self.shed.fetch_add(1, Ordering::Relaxed);
        ServiceError::Overloaded(format!(
            "server overloaded: {} ({} running, {} queued); retry with backoff",
            why, self.limit.running, self.limit.queued
        ))
    }
}

/// The gates of a server, one per [`Work`].
pub struct Admission {
    gates: [Gate; 3],
    max_wait: Duration,
}

impl Admission {
    pub fn new(cfg: &AdmissionConfig) -> Self {
        Admission {
            gates: [Gate::new(cfg.embed), Gate::new(cfg.search), Gate::new(cfg.write)],
            max_wait: cfg.max_wait,
        }
    }

    fn gate(&self, work: Work) -> &Gate {
        &self.gates[work as usize]
    }

    /// A slot for `work`: at once if one is free; otherwise after waiting in a bounded queue
    /// for at most the configured time; otherwise `ServiceError::Overloaded`.
    pub async fn admit(&self, work: Work) -> Result<OwnedSemaphorePermit, ServiceError> {
        let gate = self.gate(work);
        if let Ok(permit) = Arc::clone(&gate.slots).try_acquire_owned() {
            return Ok(permit);
        }
        if gate.waiting.fetch_add(1, Ordering::AcqRel) >= gate.limit.queued {
            gate.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(gate.shed(&format!("too many {} requests queued", work.name())));
        }
        let waited = tokio::time::timeout(self.max_wait, Arc::clone(&gate.slots).acquire_owned()).await;
        gate.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ServiceError::Internal("server is shutting down".into())),
            Err(_) => Err(gate.shed(&format!(
                "no {} slot freed within {} ms",
                work.name(),
                self.max_wait.as_millis()
            ))),
        }
    }

    /// A slot for work that must not be shed here: a canary backfill, or the embedding of a
    /// write that the write gate already admitted (and bounds). Waits as long as it takes and
    /// takes no queue place from requests.
    pub async fn admit_waiting(&self, work: Work) -> Result<OwnedSemaphorePermit, ServiceError> {
        Arc::clone(&self.gate(work).slots)
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::Internal("server is shutting down".into()))
    }

    /// Requests waiting for a slot of `work` now.
    pub fn queue_depth(&self, work: Work) -> usize {
        self.gate(work).waiting.load(Ordering::Relaxed)
    }

    /// Slots of `work` held now (by requests, writes' embeddings and background work).
    pub fn running(&self, work: Work) -> usize {
        let g = self.gate(work);
        g.limit.running.max(1).saturating_sub(g.slots.available_permits())
    }

    /// Requests shed so far, per kind: (embed, search, write).
    pub fn shed_counts(&self) -> (u64, u64, u64) {
        let n = |w: Work| self.gate(w).shed.load(Ordering::Relaxed);
        (n(Work::Embed), n(Work::Search), n(Work::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(running: usize, queued: usize, wait_ms: u64) -> AdmissionConfig {
        let l = Limit { running, queued };
        AdmissionConfig { embed: l, search: l, write: l, max_wait: Duration::from_millis(wait_ms) }
    }

    #[tokio::test]
    async fn sheds_past_the_queue_at_once_and_after_the_wait() {
        let a = Arc::new(Admission::new(&cfg(1, 1, 200)));
        let held = a.admit(Work::Search).await.unwrap();
        // One may wait; it gets the slot when it is freed.
        let waiter = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(Work::Search).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The queue is full: the next is shed without waiting.
        let t = std::time::Instant::now();
        let e = a.admit(Work::Search).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_millis(100), "shed took {:?}", t.elapsed());
        assert!(matches!(e, ServiceError::Overloaded(ref m) if m.contains("queued")), "{e}");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::ResourceExhausted);
        // Other kinds are not affected.
        drop(a.admit(Work::Write).await.unwrap());
        drop(held);
        waiter.await.unwrap().unwrap();
        assert_eq!(a.shed_counts(), (0, 1, 0));
    }

    #[tokio::test]
    async fn a_queued_request_is_shed_when_no_slot_frees_in_time() {
        let a = Admission::new(&cfg(1, 4, 30));
        let _held = a.admit(Work::Embed).await.unwrap();
        let e = a.admit(Work::Embed).await.unwrap_err();
        assert!(matches!(e, ServiceError::Overloaded(ref m) if m.contains("30 ms")), "{e}");
        // Background work waits instead of being shed.
        let bg = tokio::time::timeout(Duration::from_millis(50), a.admit_waiting(Work::Embed)).await;
        assert!(bg.is_err(), "background work must wait for the slot, not fail");
        assert_eq!(a.shed_counts(), (1, 0, 0));
    }

    #[test]
    fn zero_concurrency_is_refused() {
        assert!(cfg(0, 1, 10).validate().is_err());
        assert!(AdmissionConfig::default().validate().is_ok());
    }
}
