//! A throttle for log lines about a problem that repeats.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Logs a repeating problem once per back-off step (1 s, 2 s, 4 s … 60 s) so a
/// broker outage gives a few clear lines instead of a flood.
#[derive(Debug)]
pub struct LogThrottle {
    next_at: Mutex<Option<(Instant, Duration)>>,
    suppressed: AtomicU64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self {
            next_at: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl LogThrottle {
    /// Whether to log now; when it says yes it also returns how many were
    /// suppressed since the last line.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut next = self.next_at.lock().expect("throttle lock poisoned");
        match *next {
            Some((at, _)) if now < at => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some((_, step)) => {
                let step = (step * 2).min(Duration::from_secs(60));
                *next = Some((now + step, step));
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
            None => {
                *next = Some((now + Duration::from_secs(1), Duration::from_secs(1)));
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }

    /// The problem went away: the next occurrence is logged at once.
    pub fn reset(&self) {
        *self.next_at.lock().expect("throttle lock poisoned") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_backs_off_and_resets() {
        let t = LogThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        assert_eq!(t.allow(t0 + Duration::from_millis(500)), None);
        assert_eq!(t.allow(t0 + Duration::from_millis(1000)), Some(1));
        assert_eq!(
            t.allow(t0 + Duration::from_millis(2500)),
            None,
            "second step is 2 s"
        );
        assert_eq!(t.allow(t0 + Duration::from_millis(3000)), Some(1));
        t.reset();
        assert_eq!(t.allow(t0 + Duration::from_millis(3001)), Some(0));
    }
}
