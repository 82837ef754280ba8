//! Retry policy: exponential backoff with full jitter, server pushback, and a budget.

use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Retries allowed per call made, on average (0.2 = one retry per five calls).
    pub budget_ratio: f64,
    /// Retries the budget allows even with no calls (a floor for quiet clients).
    pub budget_floor: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(25),
            max_delay: Duration::from_secs(2),
            budget_ratio: 0.2,
            budget_floor: 20.0,
        }
    }
}

impl RetryPolicy {
    /// Full jitter: uniform in `[0, min(max, base * 2^(attempt-1))]`, and never less than
    /// what the server asked for.
    pub fn delay(&self, attempt: u32, pushback: Option<Duration>) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_delay);
        let jitter = Duration::from_nanos(rand::random::<u64>() % (exp.as_nanos() as u64).max(1));
        match pushback {
            Some(p) => p.max(jitter),
            None => jitter,
        }
    }
}

/// A token bucket: every call deposits `ratio` tokens, every retry takes one.
pub struct RetryBudget {
    tokens: Mutex<f64>,
    ratio: f64,
    cap: f64,
}

impl RetryBudget {
    pub fn new(p: &RetryPolicy) -> Self {
        RetryBudget {
            tokens: Mutex::new(p.budget_floor),
            ratio: p.budget_ratio,
            cap: p.budget_floor.max(1.0) * 10.0,
        }
    }

    pub fn deposit(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *t = (*t + self.ratio).min(self.cap);
    }

    pub fn withdraw(&self) -> bool {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_is_jittered_bounded_and_honours_pushback() {
        let p = RetryPolicy::default();
        for attempt in 1..10 {
            let cap = p
                .base_delay
                .saturating_mul(1 << (attempt - 1))
                .min(p.max_delay);
            for _ in 0..50 {
                assert!(p.delay(attempt, None) <= cap);
            }
        }
        assert!(p.delay(1, Some(Duration::from_millis(700))) >= Duration::from_millis(700));
        let spread: std::collections::BTreeSet<_> = (0..20).map(|_| p.delay(5, None)).collect();
        assert!(spread.len() > 10, "full jitter spreads retries");
    }

    #[test]
    fn budget_limits_retries_to_a_fraction_of_calls() {
        let p = RetryPolicy {
            budget_floor: 2.0,
            budget_ratio: 0.5,
            ..Default::default()
        };
        let b = RetryBudget::new(&p);
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw(), "floor spent");
        b.deposit();
        assert!(!b.withdraw(), "half a token is not a retry");
        b.deposit();
        assert!(b.withdraw());
    }
}
