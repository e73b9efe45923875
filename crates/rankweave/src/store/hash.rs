//! In-process store: ranks running as threads of one process share it.

use super::Store;
use crate::error::{Context, Error, Result};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A [`Store`] held in memory, for ranks that are threads of one process.
#[derive(Debug)]
pub struct HashStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    timeout: Mutex<Duration>,
}

impl Default for HashStore {
    fn default() -> Self {
        Self::new()
    }
}

impl HashStore {
    /// An empty store with the default timeout.
    pub fn new() -> Self {
        HashStore {
            map: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            timeout: Mutex::new(super::default_timeout()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A poisoned lock only means another thread panicked while holding it;
        // the map itself is always left consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until<F: Fn(&HashMap<String, Vec<u8>>) -> bool>(
        &self,
        op: &str,
        what: &str,
        timeout: Duration,
        ready: F,
    ) -> Result<MutexGuard<'_, HashMap<String, Vec<u8>>>> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut guard = self.lock();
        while !ready(&guard) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::timeout(
                    Context { op: op.into(), group: "hash".into(), ..Default::default() },
                    timeout,
                    what.to_string(),
                ));
            }
            guard = self.changed.wait_timeout(guard, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(guard)
    }
}

impl Store for HashStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_string(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let guard = self.wait_until("store.get", &format!("key `{key}`"), timeout, |m| m.contains_key(key))?;
        Ok(guard.get(key).cloned().unwrap_or_default())
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let what = format!("keys {keys:?}");
        drop(self.wait_until("store.wait", &what, timeout, |m| keys.iter().all(|k| m.contains_key(*k)))?);
        Ok(())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut m = self.lock();
        let cur = match m.get(key) {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| Error::Store(format!("add: key `{key}` holds a value that is not a counter")))?,
        };
        let new = cur.wrapping_add(delta);
        m.insert(key.to_string(), new.to_string().into_bytes());
        drop(m);
        self.changed.notify_all();
        Ok(new)
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        let mut m = self.lock();
        let matches = match m.get(key) {
            None => expected.is_empty(),
            Some(cur) => cur.as_slice() == expected,
        };
        if matches {
            m.insert(key.to_string(), desired.to_vec());
            drop(m);
            self.changed.notify_all();
            Ok(desired.to_vec())
        } else {
            Ok(m.get(key).cloned().unwrap_or_default())
        }
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        Ok(self.lock().remove(key).is_some())
    }

    fn num_keys(&self) -> Result<usize> {
        Ok(self.lock().len())
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let m = self.lock();
        Ok(keys.iter().all(|k| m.contains_key(*k)))
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
    }

    fn describe(&self) -> String {
        "hash (in-process)".into()
    }
}
