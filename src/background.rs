//! Background work at the lowest CPU priority: the thread pools that build segments (seal,
//! merge) and embed a canary's backfill run under `SCHED_IDLE`, so that queries and
//! acknowledgements, which a user waits on, take the CPU the moment they want it.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

thread_local! {
    /// Whether this thread was put in the idle class by [`lower_current_thread`].
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
    /// When this background thread last yielded ([`yield_point`]).
    static LAST_YIELD: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Most time a background thread computes between two yields.
pub const YIELD_EVERY: Duration = Duration::from_micros(250);

/// Called between small units of background work (a graph insert, an encoder band): on a
/// background thread that has computed for [`YIELD_EVERY`], yields the CPU (`sched_yield`).
/// Elsewhere a no-op costing one thread-local read.
///
/// Why: a thread woken from another core does not always preempt an idle-class thread at
/// once. The kernel may only mark the idle-class thread for rescheduling (lazy preemption)
/// and act on it at its next entry into the kernel or the next scheduler tick (4 ms at
/// HZ=250): a search thread then waits behind a backfill or a graph build for up to a tick.
/// Measured with `perf sched` under a canary backfill. A background thread that enters the
/// kernel every quarter millisecond bounds that wait.
#[inline]
pub fn yield_point() {
    if !BACKGROUND.get() {
        return;
    }
    let now = Instant::now();
    if LAST_YIELD.get().is_none_or(|t| now.duration_since(t) >= YIELD_EVERY) {
        std::thread::yield_now();
        LAST_YIELD.set(Some(Instant::now()));
    }
}

/// Puts the calling thread in the idle scheduling class (Linux `SCHED_IDLE`: it runs on any
/// core nothing else wants, and a normal thread that wakes up preempts it at once; plain
/// nice only shrinks its share, and a woken query could still wait out its time slice).
/// Elsewhere, or if that fails, the lowest normal priority. Failure only costs priority, so
/// it is logged, not returned.
pub fn lower_current_thread() {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    #[cfg(target_os = "linux")]
    let done = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        idle,
    );
    #[cfg(not(target_os = "linux"))]
    let done = {
        let _ = idle;
        ThreadPriority::Min.set_for_current()
    };
    if let Err(e) = done.or_else(|_| ThreadPriority::Min.set_for_current()) {
        tracing::debug!("cannot lower a background thread's priority: {e:?}");
    }
    BACKGROUND.set(true);
}

/// A rayon pool of `threads` background-priority threads named `name-N`.
pub fn pool(name: &str, threads: usize) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    let name = name.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(|_| lower_current_thread())
        .build()
}

/// Threads of the backfill pool: half the cores (at least one). Even in the idle class, an
/// encoder on every core slows queries through shared caches, memory bandwidth and allocator
/// locks; half the machine keeps serving latency near idle while a backfill runs.
pub fn backfill_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The process-wide pool for background embedding (canary backfill), of
/// [`backfill_threads`] threads; `None` if it cannot be started (the work then runs at
/// normal priority).
pub fn embed_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        pool("vitrine-backfill", backfill_threads())
            .map_err(|e| tracing::warn!("cannot start the backfill pool: {e}"))
            .ok()
    })
    .as_ref()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The scheduling policy of the calling thread, from /proc (5 is `SCHED_IDLE`).
    fn policy() -> Option<u32> {
        let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = text.lines().find(|l| l.trim_start().starts_with("policy"))?;
        line.split(':').nth(1)?.trim().parse().ok()
    }

    #[test]
    fn pool_threads_run_in_the_idle_class() {
        let Some(normal) = policy() else { return };
        assert_eq!(normal, 0, "the test thread itself is a normal thread");
        let pool = super::pool("bg-test", 2).unwrap();
        let inside = pool.install(policy);
        assert_eq!(inside, Some(5), "background threads must be SCHED_IDLE");
        assert!(pool.install(|| super::BACKGROUND.get()), "pool threads are marked background");
        assert!(!super::BACKGROUND.get(), "the caller is not");
        assert_eq!(policy(), Some(0), "the caller's own priority is untouched");
    }
}
