//! A circuit breaker per sink runner: closed (writes flow), open (the sink is failing:
//! wait out a backoff before trying again), half-open (one trial write decides).
//!
//! Every failure waits a full-jitter exponential backoff before the next attempt, so
//! retries never hammer a sick server in lockstep. `threshold` consecutive failures
//! open the breaker; while it is open nothing is sent; when the wait is over one batch
//! is tried (half-open): success closes it, failure opens it again for longer.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
    threshold: u32,
    consecutive_failures: u32,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

/// A change of state, for logs and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

impl Breaker {
    pub fn new(threshold: u32, min: Duration, max: Duration) -> Breaker {
        Breaker {
            state: State::Closed,
            threshold: threshold.max(1),
            consecutive_failures: 0,
            backoff: Backoff::new(min, max),
            retry_at: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// How long to wait before the next attempt (zero: go). Moves an open breaker whose
    /// wait is over to half-open.
    pub fn wait(&mut self, now: Instant) -> (Duration, Option<Transition>) {
        match self.retry_at {
            Some(at) if at > now => (at - now, None),
            _ => {
                self.retry_at = None;
                let transition = (self.state == State::Open).then(|| self.set(State::HalfOpen));
                (Duration::ZERO, transition.flatten())
            }
        }
    }

    pub fn on_success(&mut self) -> Option<Transition> {
        self.consecutive_failures = 0;
        self.backoff.reset();
        self.retry_at = None;
        self.set(State::Closed)
    }

    /// Records a failure; `retriable` false (the request itself is refused) waits the
    /// longest backoff at once.
    pub fn on_failure(&mut self, now: Instant, retriable: bool) -> Option<Transition> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let delay = if retriable {
            self.backoff.next_delay()
        } else {
            self.backoff.max
        };
        self.retry_at = Some(now + delay);
        if self.state == State::HalfOpen || self.consecutive_failures >= self.threshold || !retriable {
            self.set(State::Open)
        } else {
            None
        }
    }

    fn set(&mut self, to: State) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        (from != to).then_some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn consecutive_failures_open_it_and_a_trial_after_the_wait_closes_it() {
        let mut b = Breaker::new(3, ms(100), ms(1_000));
        let t0 = Instant::now();
        assert_eq!(b.wait(t0), (Duration::ZERO, None));
        assert_eq!(b.on_failure(t0, true), None);
        assert_eq!(b.on_failure(t0, true), None);
        assert_eq!(b.state(), State::Closed);
        let opened = b.on_failure(t0, true).unwrap();
        assert_eq!((opened.from, opened.to), (State::Closed, State::Open));
        // Third failure: the jittered wait is at most 400 ms (100 * 2^2).
        let (wait, none) = b.wait(t0);
        assert!(wait <= ms(400) && none.is_none(), "{wait:?}");
        let (go, half) = b.wait(t0 + ms(401));
        assert_eq!(go, Duration::ZERO);
        assert_eq!(half.unwrap().to, State::HalfOpen);
        let closed = b.on_success().unwrap();
        assert_eq!((closed.from, closed.to), (State::HalfOpen, State::Closed));
    }

    #[test]
    fn a_failed_trial_opens_it_again_for_longer() {
        let mut b = Breaker::new(1, ms(100), ms(10_000));
        let t0 = Instant::now();
        b.on_failure(t0, true);
        assert_eq!(b.state(), State::Open);
        let t1 = t0 + ms(200);
        assert_eq!(b.wait(t1).1.unwrap().to, State::HalfOpen);
        assert_eq!(b.on_failure(t1, true).unwrap().to, State::Open);
        // The second wait is drawn under a doubled ceiling (200 ms).
        assert!(b.wait(t1).0 <= ms(200));
    }

    #[test]
    fn a_refused_request_opens_it_at_once_for_the_longest_wait() {
        let mut b = Breaker::new(5, ms(100), ms(30_000));
        let t0 = Instant::now();
        assert_eq!(b.on_failure(t0, false).unwrap().to, State::Open);
        assert_eq!(b.wait(t0).0, ms(30_000));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut b = Breaker::new(2, ms(1), ms(10));
        let t0 = Instant::now();
        b.on_failure(t0, true);
        assert_eq!(b.on_success(), None);
        b.on_failure(t0, true);
        assert_eq!(b.state(), State::Closed);
    }
}
