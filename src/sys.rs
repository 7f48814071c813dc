//! The few C library calls the worker makes that neither pgrx nor std offers.

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    #[link_name = "signal"]
    fn set_signal_handler(sig: i32, handler: usize) -> usize;
    fn sigprocmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn close_range(first: u32, last: u32, flags: i32) -> i32;
}

/// glibc's `sigset_t` (1024 bits).
#[repr(C)]
struct SigSet([u64; 16]);

const SIG_DFL: usize = 0;
const SIG_SETMASK: i32 = 2;
const CLOSE_RANGE_CLOEXEC: i32 = 1 << 2;
/// The last signal number (SIGRTMAX on Linux).
const LAST_SIGNAL: i32 = 64;

/// In a child between fork and exec (async-signal-safe calls only): every signal back to its
/// default action and none blocked, since ignored and blocked signals survive exec and a server
/// process ignores or blocks several (SIGPIPE, for one); and every descriptor above stderr
/// closed at exec (the server's files and sockets).
pub fn reset_for_exec() -> std::io::Result<()> {
    // SAFETY: each call only changes this (child) process's signal state or descriptor flags.
    unsafe {
        for sig in 1..=LAST_SIGNAL {
            // SIGKILL, SIGSTOP and the signals glibc reserves refuse; that is fine.
            let _ = set_signal_handler(sig, SIG_DFL);
        }
        let empty = SigSet([0; 16]);
        if sigprocmask(SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if close_range(3, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub const SIGKILL: i32 = 9;
pub const SIGHUP: i32 = 1;
pub const SIGUSR1: i32 = 10;
pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// Sends a signal; a negative pid names a process group.
pub fn signal(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
