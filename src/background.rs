//! Background work at a lower CPU priority: the thread pools that build segments (seal,
//! merge) and embed a canary's backfill run niced, so that queries and acknowledgements,
//! which a user waits on, win the CPU whenever both want it.

use std::sync::OnceLock;

/// The nice value of background threads: at 10 a busy thread gets about a tenth of a core
/// that a nice-0 thread also wants (kernel weights 110 vs 1024), and all of an idle one.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`] (Linux: nice is per thread).
/// Failure only costs priority, so it is logged, not returned.
pub fn lower_current_thread() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
        tracing::debug!("cannot lower a background thread's priority: {e}");
    }
}

/// A rayon pool of `threads` niced threads named `name-N`.
pub fn pool(name: &str, threads: usize) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    let name = name.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(|_| lower_current_thread())
        .build()
}

/// The process-wide pool for background embedding (canary backfill), one thread per core;
/// `None` if it cannot be started (the work then runs at normal priority).
pub fn embed_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        pool("vitrine-backfill", threads)
            .map_err(|e| tracing::warn!("cannot start the backfill pool: {e}"))
            .ok()
    })
    .as_ref()
}
