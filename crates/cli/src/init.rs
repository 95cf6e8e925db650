//! PID 1's duties, when the binary is PID 1 (a bare `docker run`, a pod
//! without a shared process namespace).
//!
//! The kernel gives PID 1 every orphan of its namespace: a handler's
//! grandchild left behind by `sh -c`, or by a child killed with its group,
//! becomes ours, and a zombie for ever unless we reap it. A process that
//! reaps every child it is given would also take the exit statuses its own
//! code waits for (a handler's child, a supervised worker), so the work runs
//! in a child instead, as under tini: this process forwards the signals
//! the work handles to that child, reaps whatever exits, and exits as the
//! child does. `MICROBATCH_NO_INIT` set to any non-empty value turns it off
//! (an init of one's own).

use std::io;

/// The signals passed on to the work: those it handles (a stop, drained;
/// a terminal's new size for `top`). Others stay ignored, as PID 1 ignores
/// signals it has no handler for: forwarded, a SIGHUP or SIGUSR1 would end
/// the work without its drain, where the binary as PID 1 used to go on.
const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGWINCH];

/// Whether this process should stand as init: it is PID 1 and the user did
/// not say otherwise.
pub fn wanted() -> bool {
    std::process::id() == 1 && std::env::var_os("MICROBATCH_NO_INIT").is_none_or(|v| v.is_empty())
}

/// Forks: returns in the child, which goes on to do the work; the parent
/// stays init until the child exits, then exits with its status. Must run
/// before any thread is started.
pub fn become_init() -> io::Result<()> {
    // SAFETY: single-threaded here (first thing in main); the set is a
    // plain value; sigprocmask and fork are async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *sig);
        }
        let mut before: libc::sigset_t = std::mem::zeroed();
        // Blocked before the fork: a signal arriving in between waits in
        // the parent's queue instead of being lost (PID 1 ignores signals
        // it has no handler for).
        if libc::sigprocmask(libc::SIG_BLOCK, &set, &mut before) != 0 {
            return Err(io::Error::last_os_error());
        }
        let child = libc::fork();
        if child < 0 {
            let e = io::Error::last_os_error();
            libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            return Err(e);
        }
        if child == 0 {
            // The work: signals as they were.
            libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            return Ok(());
        }
        std::process::exit(stand_as_init(child, &set));
    }
}

/// The init loop: forwards signals to `child`, reaps every exited process,
/// and returns the exit code to leave with once `child` is gone.
///
/// # Safety
/// `set` holds the blocked signals; `child` is this process's child.
unsafe fn stand_as_init(child: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        // A second between looks at the children: a SIGCHLD merged with
        // another, or missed, is caught up with.
        let timeout = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        let sig = libc::sigtimedwait(set, &mut info, &timeout);
        if sig > 0 && sig != libc::SIGCHLD {
            libc::kill(child, sig);
        }
        // Reap all that exited; the child's status ends the loop.
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
            if pid <= 0 {
                break;
            }
            if pid == child {
                // Orphans still running are left to the namespace's end.
                return exit_code(status);
            }
        }
    }
}

/// The exit code a shell would give for a wait status.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_a_shells() {
        // Encoded as wait(2) does: exit code in the second byte, signal in
        // the low seven bits.
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(libc::SIGKILL), 128 + 9);
        assert_eq!(exit_code(libc::SIGTERM), 128 + 15);
    }
}
