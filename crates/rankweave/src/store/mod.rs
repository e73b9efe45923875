//! The rendezvous key-value store every rank meets at first.
//!
//! [`Store`] is the contract; [`HashStore`] is in-process (ranks as threads),
//! [`PrefixStore`] namespaces keys (one per group), and the TCP store
//! (`tcp` module) serves ranks in other processes and on other hosts.

mod hash;
pub mod init;
mod prefix;
pub mod protocol;
pub mod tcp;

pub use hash::HashStore;
pub use init::{rendezvous, Rendezvous};
pub use prefix::PrefixStore;
pub use tcp::{TcpStore, TcpStoreServer};

use crate::error::Result;
use std::sync::Arc;
use std::time::Duration;

/// Default timeout of blocking store operations (torch's 300 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The timeout to use when the caller gives none: `RANKWEAVE_TIMEOUT`
/// (seconds, fractional allowed) when set and valid, else [`DEFAULT_TIMEOUT`].
pub fn default_timeout() -> Duration {
    std::env::var("RANKWEAVE_TIMEOUT").ok().and_then(|v| parse_timeout(&v)).unwrap_or(DEFAULT_TIMEOUT)
}

/// Parses a timeout in seconds (fractional allowed, positive and finite).
pub fn parse_timeout(v: &str) -> Option<Duration> {
    v.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0 && *s < 1e12).map(Duration::from_secs_f64)
}

/// A key-value store shared by all ranks of a job.
///
/// Keys are strings, values bytes. Blocking calls take an explicit timeout;
/// the `*_default` helpers use [`Store::timeout`].
pub trait Store: Send + Sync {
    /// Sets `key` to `value`, waking every waiter on it.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Returns the value of `key`, waiting up to `timeout` for it to exist.
    fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;

    /// Waits until every key in `keys` exists, up to `timeout`.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()>;

    /// Adds `delta` to the counter at `key` (missing = 0) and returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;

    /// Atomically sets `key` to `desired` if its current value equals
    /// `expected` (an empty `expected` matches a missing key); returns the value
    /// now stored (`desired` on success, the current value otherwise).
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>>;

    /// Deletes `key`; returns whether it existed.
    fn delete_key(&self, key: &str) -> Result<bool>;

    /// Number of keys in the store.
    fn num_keys(&self) -> Result<usize>;

    /// True if every key in `keys` exists now (never blocks).
    fn check(&self, keys: &[&str]) -> Result<bool>;

    /// The default timeout of this store.
    fn timeout(&self) -> Duration;

    /// Changes the default timeout of this store.
    fn set_timeout(&self, timeout: Duration);

    /// Human-readable address, for error messages (`tcp://host:port`, `hash`).
    fn describe(&self) -> String;

    /// [`Store::get_timeout`] with the store's default timeout.
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.get_timeout(key, self.timeout())
    }

    /// [`Store::check`], waiting at most `reply_wait` for the answer of a
    /// remote store (a server that went silent costs that long, not the
    /// default timeout). Stores that answer locally ignore `reply_wait`.
    fn check_within(&self, keys: &[&str], reply_wait: Duration) -> Result<bool> {
        let _ = reply_wait;
        self.check(keys)
    }

    /// [`Store::wait`] with the store's default timeout.
    fn wait_default(&self, keys: &[&str]) -> Result<()> {
        self.wait(keys, self.timeout())
    }
}

/// Shared handle to any store.
pub type SharedStore = Arc<dyn Store>;
