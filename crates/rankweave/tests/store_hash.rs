//! The in-process store (and the prefix wrapper over it): every operation,
//! timeouts, concurrent adds, compare_set races.

use rankweave::{Error, HashStore, PrefixStore, SharedStore, Store};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn exercise(store: &dyn Store) {
    assert_eq!(store.num_keys().unwrap(), 0);
    store.set("a", b"1").unwrap();
    store.set("empty", b"").unwrap();
    assert_eq!(store.get("a").unwrap(), b"1");
    assert_eq!(store.get("empty").unwrap(), b"");
    store.set("a", b"2").unwrap();
    assert_eq!(store.get_timeout("a", T).unwrap(), b"2");
    assert_eq!(store.num_keys().unwrap(), 2);

    assert!(store.check(&["a", "empty"]).unwrap());
    assert!(!store.check(&["a", "missing"]).unwrap());
    assert!(store.check(&[]).unwrap());
    store.wait(&["a", "empty"], T).unwrap();

    assert_eq!(store.add("ctr", 5).unwrap(), 5);
    assert_eq!(store.add("ctr", -7).unwrap(), -2);
    assert_eq!(store.get("ctr").unwrap(), b"-2");
    store.set("not-a-counter", b"xyz").unwrap();
    assert!(matches!(store.add("not-a-counter", 1), Err(Error::Store(_))));

    assert_eq!(store.compare_set("cs", b"", b"first").unwrap(), b"first");
    assert_eq!(store.compare_set("cs", b"wrong", b"second").unwrap(), b"first");
    assert_eq!(store.compare_set("cs", b"first", b"second").unwrap(), b"second");
    assert_eq!(store.compare_set("cs-missing", b"x", b"y").unwrap(), b"");
    assert!(!store.check(&["cs-missing"]).unwrap());

    assert_eq!(store.num_keys().unwrap(), 5);
    assert!(store.delete_key("a").unwrap());
    assert!(!store.delete_key("a").unwrap());
    assert_eq!(store.num_keys().unwrap(), 4);

    store.set_timeout(Duration::from_millis(100));
    assert_eq!(store.timeout(), Duration::from_millis(100));
    assert!(matches!(store.get("a"), Err(Error::Timeout { .. })));
    store.set_timeout(T);
}

#[test]
fn every_operation() {
    exercise(&HashStore::new());
}

#[test]
fn every_operation_through_a_prefix() {
    let inner: SharedStore = Arc::new(HashStore::new());
    let p = PrefixStore::new("pp:1", inner.clone());
    exercise(&p);
    assert_eq!(inner.get("pp:1/cs").unwrap(), b"second");
    assert!(!inner.check(&["cs"]).unwrap());
    assert!(p.describe().contains("pp:1"));
}

#[test]
fn get_and_wait_time_out_naming_the_keys() {
    let s = HashStore::new();
    let t = Duration::from_millis(200);
    let start = Instant::now();
    let err = s.get_timeout("nope", t).unwrap_err();
    assert!(start.elapsed() >= t);
    assert!(matches!(err, Error::Timeout { .. }) && err.to_string().contains("nope"), "{err}");
    let err = s.wait(&["gone"], t).unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
}

#[test]
fn get_waits_for_a_later_set() {
    let s = HashStore::new();
    std::thread::scope(|sc| {
        let h = sc.spawn(|| s.get_timeout("late", T).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        s.set("late", b"v").unwrap();
        assert_eq!(h.join().unwrap(), b"v");
    });
}

#[test]
fn concurrent_adds_and_compare_set_race() {
    const THREADS: usize = 32;
    let s = HashStore::new();
    let barrier = Barrier::new(THREADS);
    let results: Vec<(usize, Vec<u8>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..THREADS)
            .map(|i| {
                let (s, barrier) = (&s, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    for _ in 0..100 {
                        s.add("total", 1).unwrap();
                    }
                    (i, s.compare_set("leader", b"", i.to_string().as_bytes()).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(s.get("total").unwrap(), (THREADS * 100).to_string().into_bytes());
    let winners = results.iter().filter(|(i, v)| *v == i.to_string().into_bytes()).count();
    assert_eq!(winners, 1);
}
