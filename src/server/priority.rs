//! Queries first: vector and SKU searches run on the query pool at the process's own
//! priority, while the gRPC runtime's threads (connections, request decoding, the write path)
//! run a few steps of `nice` lower, so that a search gets the larger share of a core they
//! compete for.
//!
//! Why: on a machine whose cores are shared by both, each acknowledged write wakes several
//! threads (a connection's runtime thread, the writer, the log's sync). `perf record -e
//! sched:sched_switch` during `live_bench`'s search-while-writing round (2 cores, 1,000
//! upserts/s), searches then on the blocking pool: a 3-4 ms search was switched out about
//! five times, and its time off the CPU (wall minus thread CPU time) reached 1.6-3.7 ms at
//! p99, most of its p99 over idle. Searches now run on their own pool, and with the runtime
//! `nice` +5 (about a third of the weight) the scheduler gives a running search three times
//! their share when they compete for a core. With no search running, writes compete only
//! with each other and nothing changes for them. Builds (seal, merge, backfill) stay in the
//! idle class below both ([`crate::background`]). README (Performance) has what it measured.
//!
//! Linux only (elsewhere `nice` applies to the whole process, not one thread): on other
//! systems every thread keeps the process's priority.

use crate::server::ServiceError;

/// How many steps of `nice` the runtime's threads run below the query pool by default.
pub const DEFAULT_IO_NICE: i32 = 5;

/// The server's tokio runtime, its threads (and every thread they start: the blocking pool,
/// the index writer, the log's helpers) `io_nice` steps of `nice` below the calling thread; 0
/// leaves them as they are.
///
/// Starts rayon's global pool first, from the calling thread: searches run there
/// ([`on_query_pool`]), as does the encoder's forward pass, and a thread inherits its
/// creator's priority, which an unprivileged thread cannot raise again. Call it from a thread
/// at the process's own priority (`main`).
pub fn runtime(io_nice: i32) -> std::io::Result<tokio::runtime::Runtime> {
    let _ = rayon::current_num_threads();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if io_nice > 0 {
        // One target for every thread: a blocking thread started by a runtime thread already
        // inherits the lowered value and must not be lowered twice.
        let target = current_nice().map(|base| (base + io_nice).min(19));
        builder.on_thread_start(move || {
            if let Some(target) = target {
                set_current_nice(target);
            }
        });
    }
    builder.build()
}

/// The calling thread's `nice` value (Linux; `None` elsewhere or if it cannot be read).
fn current_nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        // On Linux `nice` belongs to the thread: `None` is the calling thread, not the process.
        rustix::process::getpriority_process(None)
            .map_err(|e| tracing::debug!("cannot read the thread's priority: {e}"))
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Sets the calling thread's `nice` value to `target` if that lowers it (Linux). Failure
/// only costs priority, so it is logged, not returned.
fn set_current_nice(target: i32) {
    #[cfg(target_os = "linux")]
    if current_nice().is_some_and(|now| now < target)
        && let Err(e) = rustix::process::setpriority_process(None, target)
    {
        tracing::debug!("cannot lower a runtime thread's priority: {e}");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = target;
}

/// Runs `work` (a search: CPU only, never waiting on another pool thread) on rayon's global
/// pool and waits for it without holding a runtime thread. A panic becomes
/// `Internal("{what} task failed: ...")`, as on the blocking pool.
pub async fn on_query_pool<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
    });
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(panic)) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panicked".into());
            Err(ServiceError::Internal(format!("{what} task failed: {why}")))
        }
        Err(_) => Err(ServiceError::Internal(format!("{what} task failed: dropped"))),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's nice value, from /proc (field 19 of its stat line).
    fn nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // The command name (field 2) may hold spaces: count from the closing parenthesis.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn runtime_threads_run_below_the_query_pool() {
        let base = nice();
        let rt = runtime(3).unwrap();
        let (worker, blocking, nested, query) = rt.block_on(async {
            let worker = tokio::spawn(async { nice() }).await.unwrap();
            // The runtime's first blocking thread, started by a worker (already lowered): it
            // inherits the lowered value, and its start hook must not lower it again.
            let blocking =
                tokio::spawn(async { tokio::task::spawn_blocking(nice).await.unwrap() }).await.unwrap();
            // A plain thread started by a blocking thread (as the index writer is) inherits it.
            let nested =
                tokio::task::spawn_blocking(|| std::thread::spawn(nice).join().unwrap()).await.unwrap();
            let query = on_query_pool("probe", nice).await.unwrap();
            (worker, blocking, nested, query)
        });
        let lowered = (base + 3).min(19);
        assert_eq!(worker, lowered, "runtime worker");
        assert_eq!(blocking, lowered, "blocking pool thread started by a worker");
        assert_eq!(nested, lowered, "thread started by a blocking thread");
        assert_eq!(query, base, "query pool thread");
    }

    #[test]
    fn a_panicking_search_is_an_internal_error() {
        let rt = runtime(0).unwrap();
        let err = rt.block_on(on_query_pool("search", || -> u32 { panic!("boom") })).unwrap_err();
        assert!(matches!(&err, ServiceError::Internal(m) if m == "search task failed: boom"), "{err:?}");
    }
}
