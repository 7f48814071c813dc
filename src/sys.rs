//! The few C library calls the worker makes that neither pgrx nor std offers.

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

pub const SIGKILL: i32 = 9;
pub const SIGHUP: i32 = 1;
pub const SIGUSR1: i32 = 10;
pub const SIGINT: i32 = 2;

/// Sends a signal; a negative pid names a process group.
pub fn signal(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
