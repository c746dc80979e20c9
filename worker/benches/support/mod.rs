//! Shared by the worker's benchmarks.

/// Nanoseconds this thread has spent on a CPU (Linux), so a busy machine does not skew the figure.
pub fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}
