//! Admission control: bounded concurrency per kind of work (image embedding, index search,
//! writes), each with a bounded queue and a bounded wait. A request past either bound is shed
//! at once with `RESOURCE_EXHAUSTED` (and counted) instead of queueing without limit, so a
//! spike costs the requests that cannot be served in time, not the server's memory or the
//! latency of those it admits.
//!
//! Queries (embeddings and searches) are also held to an expected wait: each gate keeps a
//! moving average of how long its slots are held, and a query that would wait longer than
//! about one such service time ([`may_queue`]) is shed at once. So an admitted query's
//! latency stays near twice its service time however long the queue could be, whether a
//! search takes 30 µs (a small catalogue: dozens may wait) or 3 ms (a large one: one per
//! slot).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    /// Whether requests of this kind are held to an expected wait ([`may_queue`]): queries are;
    /// writes are not (the writer batches concurrent writes into one log sync, so a write's
    /// service time says little about the wait, and a shed write costs its client a retry).
    fn paced(self) -> bool {
        matches!(self, Work::Embed | Work::Search)
    }

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
    /// 50 ms, and a query (embed or search) waits only while its expected wait is within one
    /// mean service time ([`may_queue`]). The embed queue is as deep as the slots: an
    /// admitted image query waits at most about one embedding before it runs, which keeps its
    /// p99 under twice the unloaded one however large the spike (measured with
    /// examples/loadgen: 1.36x under a 20x spike).
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

/// A query waits for a slot when its expected wait is at most this, however short its kind's
/// service time: it covers the scheduling noise of a busy server, so that small bursts of
/// very fast searches (tens of microseconds) queue instead of being shed.
pub const WAIT_FLOOR: Duration = Duration::from_millis(1);

/// Whether a query that finds all `running` slots busy, with `ahead` queries already waiting,
/// may wait for one: the slots must serve `ahead + 1` queries before its turn, in rounds of
/// `running` at the mean service time `service`, and that wait must be at most the larger of
/// [`WAIT_FLOOR`] and one service time. A query admitted this way waits about one service
/// time at most, so its latency stays within about twice the unloaded one.
pub fn may_queue(ahead: usize, running: usize, service: Duration) -> bool {
    let rounds = (ahead + 1).div_ceil(running.max(1)) as u32;
    service.saturating_mul(rounds) <= service.max(WAIT_FLOOR)
}

/// Weight of the newest sample in a gate's moving average of service times: 1/`EWMA_SHIFT`
/// as a power of two (1/16: it follows a change of catalogue or load within a few dozen
/// requests and is not moved much by one slow request).
const EWMA_SHIFT: u32 = 4;

struct Gate {
    slots: Arc<Semaphore>,
    limit: Limit,
    waiting: AtomicUsize,
    shed: AtomicU64,
    /// Moving average of how long admitted requests held a slot, in nanoseconds (0 until the
    /// first one is released).
    service_ns: Arc<AtomicU64>,
}

impl Gate {
    fn new(limit: Limit) -> Self {
        Gate {
            slots: Arc::new(Semaphore::new(limit.running.max(1))),
            limit,
            waiting: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
            service_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    fn service(&self) -> Duration {
        Duration::from_nanos(self.service_ns.load(Ordering::Relaxed))
    }

    fn permit(&self, slot: OwnedSemaphorePermit, timed: bool) -> Permit {
        Permit { _slot: slot, timed: timed.then(|| (Instant::now(), Arc::clone(&self.service_ns))) }
    }

    fn shed(&self, why: &str) -> ServiceError {
        self.shed.fetch_add(1, Ordering::Relaxed);
        ServiceError::Overloaded(format!(
            "server overloaded: {} ({} running, {} queued); retry with backoff",
            why, self.limit.running, self.limit.queued
        ))
    }
}

/// An admitted request's slot, released when dropped. A request's permit records how long it
/// was held into its gate's moving average of service times.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    timed: Option<(Instant, Arc<AtomicU64>)>,
}

impl Permit {
    /// Restarts the clock of the service time when the work itself starts (on its pool): the
    /// time it waited for a thread then does not count. Under a flood of requests that time
    /// is the runtime's backlog, not the work's, and counting it would shed queries that the
    /// slots could serve.
    pub fn working(mut self) -> Self {
        if let Some((since, _)) = &mut self.timed {
            *since = Instant::now();
        }
        self
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((since, avg)) = self.timed.take() {
            let sample = since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            let old = avg.load(Ordering::Relaxed);
            // Racing updates may lose a sample: an average, not an account.
            let new = if old == 0 { sample } else { old - (old >> EWMA_SHIFT) + (sample >> EWMA_SHIFT) };
            avg.store(new, Ordering::Relaxed);
        }
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
    /// for at most the configured time (a query only while its expected wait allows,
    /// [`may_queue`]); otherwise `ServiceError::Overloaded`.
    pub async fn admit(&self, work: Work) -> Result<Permit, ServiceError> {
        let gate = self.gate(work);
        if let Ok(slot) = Arc::clone(&gate.slots).try_acquire_owned() {
            return Ok(gate.permit(slot, true));
        }
        let ahead = gate.waiting.fetch_add(1, Ordering::AcqRel);
        let service = gate.service();
        let refused = if ahead >= gate.limit.queued {
            Some(format!("too many {} requests queued", work.name()))
        } else if work.paced() && !may_queue(ahead, gate.limit.running, service) {
            Some(format!(
                "{ahead} {} requests already wait for a slot (about {:.1} ms each)",
                work.name(),
                service.as_secs_f64() * 1e3
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            gate.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(gate.shed(&why));
        }
        let waited = tokio::time::timeout(self.max_wait, Arc::clone(&gate.slots).acquire_owned()).await;
        gate.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(slot)) => Ok(gate.permit(slot, true)),
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
    /// Its time is not a request's and does not count in the mean service time.
    pub async fn admit_waiting(&self, work: Work) -> Result<Permit, ServiceError> {
        let gate = self.gate(work);
        let slot = Arc::clone(&gate.slots)
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::Internal("server is shutting down".into()))?;
        Ok(gate.permit(slot, false))
    }

    /// The moving average of how long requests of `work` held their slot (zero before the
    /// first).
    pub fn mean_service(&self, work: Work) -> Duration {
        self.gate(work).service()
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
    fn a_query_may_wait_about_one_service_time() {
        let ms = Duration::from_millis;
        // Slow searches: one waiter per slot.
        assert!(may_queue(0, 1, ms(3)));
        assert!(!may_queue(1, 1, ms(3)));
        assert!(may_queue(1, 2, ms(3)));
        assert!(!may_queue(2, 2, ms(3)));
        // Fast ones: as many as fit into the floor.
        let fast = Duration::from_micros(30);
        assert!(may_queue(32, 1, fast));
        assert!(!may_queue(33, 1, fast));
        assert!(may_queue(65, 2, fast));
        assert!(!may_queue(66, 2, fast));
        // Before the first sample: only the queue's length bounds it.
        assert!(may_queue(10_000, 1, Duration::ZERO));
    }

    #[tokio::test]
    async fn queries_past_their_expected_wait_are_shed_and_writes_queue() {
        let a = Arc::new(Admission::new(&cfg(1, 8, 2_000)));
        for work in [Work::Search, Work::Write] {
            // One request that holds its slot for 40 ms sets the mean service time.
            let p = a.admit(work).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
            drop(p);
            assert!(a.mean_service(work) >= Duration::from_millis(40), "{:?}", a.mean_service(work));
        }
        let held = a.admit(Work::Search).await.unwrap();
        let first = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(Work::Search).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A second waiter would wait two service times: shed at once, although the queue
        // has room.
        let t = Instant::now();
        let e = a.admit(Work::Search).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_millis(30), "shed took {:?}", t.elapsed());
        assert!(matches!(e, ServiceError::Overloaded(ref m) if m.contains("already wait")), "{e}");
        drop(held);
        first.await.unwrap().unwrap();
        // Writes queue up to the queue's length whatever their service time.
        let held = a.admit(Work::Write).await.unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let a = Arc::clone(&a);
                tokio::spawn(async move { a.admit(Work::Write).await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.queue_depth(Work::Write), 3);
        drop(held);
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(a.shed_counts(), (0, 1, 0));
        // Background work does not move the average.
        let before = a.mean_service(Work::Embed);
        let bg = a.admit_waiting(Work::Embed).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(bg);
        assert_eq!(a.mean_service(Work::Embed), before);
    }

    #[test]
    fn zero_concurrency_is_refused() {
        assert!(cfg(0, 1, 10).validate().is_err());
        assert!(AdmissionConfig::default().validate().is_ok());
    }
}
