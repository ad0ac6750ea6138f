//! The one way a test waits: poll a read of cluster state until a condition holds, with
//! one deadline, and on timeout report what was awaited and the last state seen (the
//! model is openraft's `metrics::Wait`). Tests wait for the state that proves what they
//! assert, never for a fixed time.
//!
//! ```ignore
//! let v = Wait::new(WAIT)
//!     .until("vm-a running", || get_vm(&mut c, "vm-a"), |v| v.runtime().name() == "running")
//!     .await?;
//! ```

use std::fmt::{Debug, Display};
use std::future::Future;
use std::time::{Duration, Instant};

use crate::HarnessError;

/// How long process tests wait for any one thing by default: generous, because the CI
/// machine has two cores that other builds share.
pub const WAIT: Duration = Duration::from_secs(90);

/// Default time between two reads. Paces the poll (it is not what a test waits for).
pub const POLL: Duration = Duration::from_millis(50);

/// A deadline and a poll interval.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    timeout: Duration,
    poll: Duration,
}

impl Wait {
    pub fn new(timeout: Duration) -> Wait {
        Wait {
            timeout,
            poll: POLL,
        }
    }

    /// Reads every `poll` instead of every [`POLL`].
    pub fn poll(self, poll: Duration) -> Wait {
        Wait { poll, ..self }
    }

    /// Calls `read` until `cond` holds for what it returned, and returns that. A read that
    /// fails is retried (the cluster may be between leaders). On timeout the error names
    /// `what` and the last value read, or the last error when no read succeeded since.
    pub async fn until<T, E, F, Fut>(
        &self,
        what: &str,
        mut read: F,
        mut cond: impl FnMut(&T) -> bool,
    ) -> Result<T, HarnessError>
    where
        T: Debug,
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let start = Instant::now();
        loop {
            let last = match read().await {
                Ok(v) if cond(&v) => return Ok(v),
                Ok(v) => format!("{v:?}"),
                Err(e) => format!("error: {e}"),
            };
            if start.elapsed() >= self.timeout {
                return Err(HarnessError::WaitTimeout {
                    what: what.to_owned(),
                    waited_ms: self.timeout.as_millis() as u64,
                    last,
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// [`Wait::until`] for blocking reads (e.g. running `clusterctl`), sleeping the thread
    /// between them.
    pub fn until_blocking<T, E>(
        &self,
        what: &str,
        mut read: impl FnMut() -> Result<T, E>,
        mut cond: impl FnMut(&T) -> bool,
    ) -> Result<T, HarnessError>
    where
        T: Debug,
        E: Display,
    {
        let start = Instant::now();
        loop {
            let last = match read() {
                Ok(v) if cond(&v) => return Ok(v),
                Ok(v) => format!("{v:?}"),
                Err(e) => format!("error: {e}"),
            };
            if start.elapsed() >= self.timeout {
                return Err(HarnessError::WaitTimeout {
                    what: what.to_owned(),
                    waited_ms: self.timeout.as_millis() as u64,
                    last,
                });
            }
            std::thread::sleep(self.poll);
        }
    }

    /// Like [`Wait::until`] for reads that find what they look for or not (`Ok(None)`).
    pub async fn until_some<T, E, F, Fut>(&self, what: &str, mut read: F) -> Result<T, HarnessError>
    where
        T: Debug,
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let found = self.until(what, &mut read, Option::is_some).await?;
        found.ok_or_else(|| HarnessError::WaitTimeout {
            what: what.to_owned(),
            waited_ms: self.timeout.as_millis() as u64,
            last: "found, then lost".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_value_that_satisfies_the_condition() {
        let mut n = 0u32;
        let v = Wait::new(Duration::from_secs(10))
            .poll(Duration::from_millis(1))
            .until(
                "n reaches 3",
                || {
                    n += 1;
                    let v = n;
                    async move { Ok::<_, String>(v) }
                },
                |v| *v >= 3,
            )
            .await;
        assert_eq!(v.ok(), Some(3));
    }

    #[tokio::test]
    async fn times_out_with_the_last_value_and_the_last_error() {
        let mut n = 0u32;
        let e = Wait::new(Duration::from_millis(100))
            .poll(Duration::from_millis(1))
            .until(
                "n reaches 1000",
                || {
                    n += 1;
                    let v = n;
                    async move { Ok::<_, String>(v) }
                },
                |v| *v >= 1000,
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("n reaches 1000") && e.ends_with(&format!("last seen: {n}")),
            "{e}"
        );
        let e = Wait::new(Duration::from_millis(100))
            .until_some("a leader", || async { Err::<Option<u64>, _>("no route") })
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a leader") && e.contains("error: no route"),
            "{e}"
        );
    }
}
