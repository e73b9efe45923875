//! A store view that namespaces every key (one per group).

use super::{SharedStore, Store};
use crate::error::Result;
use std::time::Duration;

/// Prepends `prefix/` to every key of an inner store.
#[derive(Clone)]
pub struct PrefixStore {
    prefix: String,
    inner: SharedStore,
}

impl PrefixStore {
    /// Wraps `inner` so that key `k` is stored as `prefix/k`.
    pub fn new(prefix: impl Into<String>, inner: SharedStore) -> Self {
        PrefixStore { prefix: prefix.into(), inner }
    }

    /// The prefix (without the trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, k: &str) -> String {
        format!("{}/{}", self.prefix, k)
    }
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.set(&self.key(key), value)
    }
    fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.inner.get_timeout(&self.key(key), timeout)
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.inner.wait(&refs, timeout)
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.inner.add(&self.key(key), delta)
    }
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        self.inner.compare_set(&self.key(key), expected, desired)
    }
    fn delete_key(&self, key: &str) -> Result<bool> {
        self.inner.delete_key(&self.key(key))
    }
    fn num_keys(&self) -> Result<usize> {
        self.inner.num_keys()
    }
    fn check(&self, keys: &[&str]) -> Result<bool> {
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.inner.check(&refs)
    }
    fn check_within(&self, keys: &[&str], reply_wait: Duration) -> Result<bool> {
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.inner.check_within(&refs, reply_wait)
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    fn set_timeout(&self, timeout: Duration) {
        self.inner.set_timeout(timeout)
    }
    fn describe(&self) -> String {
        format!("{} [prefix {}]", self.inner.describe(), self.prefix)
    }
}
