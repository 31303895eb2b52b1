//! Waiting for a test bed's shared state (a server's connections, captured frames) to get
//! somewhere: threads that fill it notify a condition variable, waiters re-examine it.
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What `pick` finds in the state behind `state`, re-examined each time `changed` is notified,
/// or `None` once `timeout` has passed. A poisoned lock is taken over: a panicking filler
/// thread must not hide what it had seen.
pub fn wait_for<S, T>(
    state: &Mutex<S>,
    changed: &Condvar,
    timeout: Duration,
    mut pick: impl FnMut(&S) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(found) = pick(&guard) {
            return Some(found);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        guard = changed
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
