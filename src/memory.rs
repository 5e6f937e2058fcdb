//! Returning memory after bursts.
//!
//! A large drain (a backlog of a million changes, a bulk update of big
//! refreshed rows) makes every stage allocate at once; afterwards glibc's
//! allocator keeps most of the freed memory in its arenas (about 30 MB
//! measured, against 9 MB right after start), so an idle daemon looks as
//! large as a busy one to whoever sets its memory limit. `malloc_trim(0)`
//! hands the free pages of every arena back. It walks the arenas, which
//! costs a few milliseconds, so the apply loop calls it only once it is
//! idle after having moved a lot of bytes (see [`Trimmer`]).
//!
//! Other allocators were measured instead (mimalloc: worse on every
//! figure, see BENCHMARKS.md); on targets without glibc this does nothing.

/// Bytes applied since the last trim before an idle moment trims again:
/// below this the allocator's retained memory is small and reused anyway.
const TRIM_AFTER_BYTES: usize = 8 << 20;

/// Decides when the allocator is asked to return memory.
#[derive(Debug, Default)]
pub struct Trimmer {
    /// Bytes moved through the pipeline since the last trim.
    since_trim: usize,
    /// Trim once more at the next idle moment: other tasks (the transport's
    /// buffers, connections) free their share a little after the sink.
    again: bool,
}

impl Trimmer {
    /// Notes `bytes` moved through the pipeline.
    pub fn moved(&mut self, bytes: usize) {
        self.since_trim = self.since_trim.saturating_add(bytes);
    }

    /// The pipeline is idle: trims when enough moved since the last time.
    pub fn idle(&mut self) {
        if self.since_trim >= TRIM_AFTER_BYTES {
            self.since_trim = 0;
            self.again = true;
            trim();
        } else if std::mem::take(&mut self.again) {
            trim();
        }
    }
}

/// Returns free memory of every malloc arena to the OS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim takes no pointers and only releases pages the
    // allocator itself holds as free; it is thread-safe (it locks each
    // arena in turn).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Nothing to do without glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimming waits for enough bytes, then starts counting again.
    #[test]
    fn trims_only_after_enough_bytes() {
        let mut t = Trimmer::default();
        t.moved(TRIM_AFTER_BYTES - 1);
        t.idle();
        assert_eq!(t.since_trim, TRIM_AFTER_BYTES - 1);
        t.moved(1);
        t.idle();
        assert_eq!(t.since_trim, 0);
        assert!(t.again, "once more at the next idle moment");
        t.idle();
        assert!(!t.again);
    }
}
