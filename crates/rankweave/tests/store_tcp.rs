//! The TCP rendezvous store: every operation over a real socket, timeouts,
//! concurrency, misbehaving clients, the token, init methods, a dead server.

use rankweave::store::init::{rendezvous, rendezvous_with_env};
use rankweave::store::protocol::{self, Request};
use rankweave::{Error, Store, TcpStore, TcpStoreServer};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn server() -> TcpStoreServer {
    TcpStoreServer::builder().token(None).bind("127.0.0.1:0").unwrap()
}

fn client(srv: &TcpStoreServer) -> TcpStore {
    TcpStore::builder("127.0.0.1", srv.port()).token(None).timeout(T).connect().unwrap()
}

/// Sends raw bytes on a fresh connection and reads until the server closes
/// it; returns what came back. Panics if the server keeps it open for 5 s.
fn raw_exchange(srv: &TcpStoreServer, bytes: &[u8], close_write: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    if close_write {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("server did not close the bad connection: {e}"),
    }
    out
}

/// Every operation against any store, with exact expectations.
fn exercise(store: &dyn Store) {
    assert_eq!(store.num_keys().unwrap(), 0);
    store.set("a", b"1").unwrap();
    store.set("empty", b"").unwrap();
    let big: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
    store.set("big", &big).unwrap();
    assert_eq!(store.get("a").unwrap(), b"1");
    assert_eq!(store.get("empty").unwrap(), b"");
    assert_eq!(store.get_timeout("big", T).unwrap(), big);
    store.set("a", b"2").unwrap();
    assert_eq!(store.get("a").unwrap(), b"2");
    assert_eq!(store.num_keys().unwrap(), 3);

    assert!(store.check(&["a", "empty"]).unwrap());
    assert!(!store.check(&["a", "missing"]).unwrap());
    assert!(store.check(&[]).unwrap());
    store.wait(&["a", "big"], T).unwrap();
    store.wait_default(&[]).unwrap();

    assert_eq!(store.add("ctr", 5).unwrap(), 5);
    assert_eq!(store.add("ctr", -7).unwrap(), -2);
    assert_eq!(store.get("ctr").unwrap(), b"-2");
    assert!(matches!(store.add("a-bytes", 0), Ok(0)));
    store.set("not-a-counter", b"xyz").unwrap();
    assert!(matches!(store.add("not-a-counter", 1), Err(Error::Store(_))));

    // compare_set: empty expected matches a missing key.
    assert_eq!(store.compare_set("cs", b"", b"first").unwrap(), b"first");
    assert_eq!(store.compare_set("cs", b"wrong", b"second").unwrap(), b"first");
    assert_eq!(store.compare_set("cs", b"first", b"second").unwrap(), b"second");
    assert_eq!(store.get("cs").unwrap(), b"second");
    assert_eq!(store.compare_set("cs-missing", b"x", b"y").unwrap(), b"");
    assert!(!store.check(&["cs-missing"]).unwrap());

    let n = store.num_keys().unwrap();
    assert!(store.delete_key("a").unwrap());
    assert!(!store.delete_key("a").unwrap());
    assert_eq!(store.num_keys().unwrap(), n - 1);
    assert!(!store.check(&["a"]).unwrap());

    let old = store.timeout();
    store.set_timeout(Duration::from_millis(150));
    assert_eq!(store.timeout(), Duration::from_millis(150));
    assert!(matches!(store.get("a"), Err(Error::Timeout { .. })));
    store.set_timeout(old);
}

#[test]
fn every_operation() {
    let srv = server();
    let c = client(&srv);
    exercise(&c);
    assert_eq!(c.describe(), format!("tcp://127.0.0.1:{}", srv.port()));
    // A second client sees the same data.
    let c2 = client(&srv);
    assert_eq!(c2.get("cs").unwrap(), b"second");
}

#[test]
fn prefix_store_over_tcp() {
    let srv = server();
    let c: rankweave::SharedStore = Arc::new(client(&srv));
    let p = rankweave::PrefixStore::new("tp:0", c.clone());
    p.set("k", b"v").unwrap();
    assert_eq!(c.get("tp:0/k").unwrap(), b"v");
    assert!(p.check(&["k"]).unwrap());
    assert!(!c.check(&["k"]).unwrap());
}

#[test]
fn get_waits_for_a_later_set() {
    let srv = server();
    let (a, b) = (client(&srv), client(&srv));
    std::thread::scope(|s| {
        let h = s.spawn(|| a.get_timeout("late", T).unwrap());
        let w = s.spawn(|| b.wait(&["late", "later"], T));
        std::thread::sleep(Duration::from_millis(50));
        let c = client(&srv);
        c.set("late", b"here").unwrap();
        c.set("later", b"too").unwrap();
        assert_eq!(h.join().unwrap(), b"here");
        w.join().unwrap().unwrap();
    });
}

#[test]
fn one_handle_shared_by_threads_never_deadlocks() {
    // A thread blocked in `get` must not hold up a `set` on the same handle.
    let srv = server();
    let c = client(&srv);
    std::thread::scope(|s| {
        let getters: Vec<_> = (0..3).map(|_| s.spawn(|| c.get_timeout("shared", T).unwrap())).collect();
        std::thread::sleep(Duration::from_millis(50));
        c.set("shared", b"ok").unwrap();
        for g in getters {
            assert_eq!(g.join().unwrap(), b"ok");
        }
    });
    assert_eq!(c.num_keys().unwrap(), 1);
}

#[test]
fn get_and_wait_time_out_naming_the_keys() {
    let srv = server();
    let c = client(&srv);
    c.set("present", b"x").unwrap();
    let t = Duration::from_millis(200);

    let start = Instant::now();
    let err = c.get_timeout("nope", t).unwrap_err();
    let took = start.elapsed();
    assert!(took >= t && took < Duration::from_secs(2), "{took:?}");
    match &err {
        Error::Timeout { ctx, waited, detail } => {
            assert_eq!(ctx.op, "store.get");
            assert_eq!(ctx.group, c.describe());
            assert_eq!(*waited, t);
            assert!(detail.contains("nope"), "{detail}");
        }
        e => panic!("expected a timeout, got {e}"),
    }

    let start = Instant::now();
    let err = c.wait(&["present", "absent-1"], t).unwrap_err();
    assert!(start.elapsed() >= t);
    let msg = err.to_string();
    assert!(matches!(err, Error::Timeout { .. }), "{msg}");
    assert!(msg.contains("absent-1") && msg.contains("store.wait"), "{msg}");

    // The connection is still fine after a server-side timeout.
    assert_eq!(c.get("present").unwrap(), b"x");
    // A zero timeout answers at once.
    assert!(matches!(c.get_timeout("nope", Duration::ZERO), Err(Error::Timeout { .. })));
    assert_eq!(c.get_timeout("present", Duration::ZERO).unwrap(), b"x");
}

#[test]
fn concurrent_adds_are_exact() {
    const CLIENTS: usize = 32;
    const ADDS: usize = 50;
    let srv = server();
    let clients: Vec<TcpStore> = (0..CLIENTS).map(|_| client(&srv)).collect();
    let barrier = Barrier::new(CLIENTS);
    let mut seen: Vec<i64> = std::thread::scope(|s| {
        let hs: Vec<_> = clients
            .iter()
            .map(|c| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    (0..ADDS).map(|_| c.add("total", 1).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    seen.sort_unstable();
    let want: Vec<i64> = (1..=(CLIENTS * ADDS) as i64).collect();
    assert_eq!(seen, want, "every add must return a distinct new value");
    assert_eq!(clients[0].get("total").unwrap(), (CLIENTS * ADDS).to_string().into_bytes());
}

#[test]
fn compare_set_race_has_one_winner() {
    const CLIENTS: usize = 32;
    let srv = server();
    for round in 0..3 {
        let key = format!("leader-{round}");
        let clients: Vec<TcpStore> = (0..CLIENTS).map(|_| client(&srv)).collect();
        let barrier = Barrier::new(CLIENTS);
        let results: Vec<(usize, Vec<u8>)> = std::thread::scope(|s| {
            let hs: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (barrier, key) = (&barrier, &key);
                    s.spawn(move || {
                        barrier.wait();
                        (i, c.compare_set(key, b"", i.to_string().as_bytes()).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> =
            results.iter().filter(|(i, v)| *v == i.to_string().into_bytes()).map(|r| r.0).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let w = winners[0].to_string().into_bytes();
        assert!(results.iter().all(|(_, v)| *v == w), "everyone sees the winner");
        assert_eq!(clients[0].get(&key).unwrap(), w);
    }
}

#[test]
fn bad_clients_are_dropped_and_others_served() {
    let srv = server();
    let good = client(&srv);
    good.set("k", b"v").unwrap();

    let valid = protocol::encode_request(&Request::Set { key: "bad".into(), value: vec![7; 100] }).unwrap();
    // Garbage.
    let reply = raw_exchange(&srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
    assert!(matches!(protocol::decode_response(&reply), Ok(protocol::Response::Error(_))), "{reply:?}");
    // Wrong version.
    let mut v2 = valid.clone();
    v2[0] = 2;
    raw_exchange(&srv, &v2, false);
    // Oversized length: announced, never sent.
    let mut huge = valid[..6].to_vec();
    huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
    let reply = raw_exchange(&srv, &huge, false);
    let msg = format!("{:?}", protocol::decode_response(&reply));
    assert!(msg.contains("limit"), "{msg}");
    // A big length within the limit, a few bytes, then a disconnect.
    let mut big = valid[..6].to_vec();
    big[2..6].copy_from_slice(&((protocol::MAX_VALUE_LEN as u32) + 100).to_le_bytes());
    big.extend_from_slice(&[1, 0, 0, 0, b'x']);
    raw_exchange(&srv, &big, true);
    // Half a frame, then a disconnect (in the header and in the payload).
    raw_exchange(&srv, &valid[..3], true);
    raw_exchange(&srv, &valid[..valid.len() / 2], true);
    // A well-framed payload that does not decode (bad UTF-8 key).
    let mut bad_key = valid.clone();
    bad_key[10] = 0xff;
    raw_exchange(&srv, &bad_key, false);
    // Trailing junk inside the frame.
    let mut trailing = protocol::encode_request(&Request::DeleteKey { key: "k".into() }).unwrap();
    trailing[2] += 1;
    trailing.push(0);
    raw_exchange(&srv, &trailing, false);

    // Nothing of the bad frames reached the map; everyone else is served.
    assert_eq!(good.get("k").unwrap(), b"v");
    assert!(!good.check(&["bad"]).unwrap());
    let fresh = client(&srv);
    fresh.set("k2", b"w").unwrap();
    assert_eq!(good.get("k2").unwrap(), b"w");
    assert_eq!(good.num_keys().unwrap(), 2);
}

#[test]
fn client_rejects_oversized_input_and_keeps_working() {
    let srv = server();
    let c = client(&srv);
    let long_key = "k".repeat(protocol::MAX_KEY_LEN + 1);
    assert!(matches!(c.set(&long_key, b"v"), Err(Error::InvalidArgument(_))));
    let keys: Vec<String> = (0..=protocol::MAX_KEYS).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert!(matches!(c.check(&refs), Err(Error::InvalidArgument(_))));
    let ok_key = "k".repeat(protocol::MAX_KEY_LEN);
    c.set(&ok_key, b"v").unwrap();
    assert_eq!(c.get(&ok_key).unwrap(), b"v");
}

#[test]
fn token_is_required_when_configured() {
    let srv = TcpStoreServer::builder().token(Some(b"s3cret")).bind("127.0.0.1:0").unwrap();
    let port = srv.port();

    let ok = TcpStore::builder("127.0.0.1", port).token(Some(b"s3cret")).timeout(T).connect().unwrap();
    ok.set("secret-key", b"v").unwrap();

    match TcpStore::builder("127.0.0.1", port).token(Some(b"wrong")).timeout(T).connect() {
        Err(Error::Unauthorized(m)) => assert!(m.contains("token") || m.contains("TOKEN"), "{m}"),
        other => panic!("wrong token must be refused, got {other:?}"),
    }

    let none = TcpStore::builder("127.0.0.1", port).token(None).timeout(T).connect().unwrap();
    assert!(matches!(none.get("secret-key"), Err(Error::Unauthorized(_))));
    // The refused connection is closed: later calls fail without reaching the data.
    assert!(none.get("secret-key").is_err());

    // A raw client that skips authentication gets Unauthorized and EOF.
    let get = protocol::encode_request(&Request::Get { key: "secret-key".into(), timeout_ms: 0 }).unwrap();
    let reply = raw_exchange(&srv, &get, false);
    assert!(matches!(protocol::decode_response(&reply), Ok(protocol::Response::Unauthorized(_))), "{reply:?}");

    assert_eq!(ok.get("secret-key").unwrap(), b"v");

    // A client with a token talking to a server without one is fine.
    let open = server();
    let c = TcpStore::builder("127.0.0.1", open.port()).token(Some(b"any")).timeout(T).connect().unwrap();
    c.set("x", b"y").unwrap();
}

#[test]
fn many_connections_with_blocked_getters() {
    const CLIENTS: usize = 256;
    const BLOCKED: usize = 64;
    let srv = server();
    let clients: Vec<TcpStore> = (0..CLIENTS).map(|_| client(&srv)).collect();
    // One round trip each: after a reply the server has accepted the connection.
    for c in &clients {
        assert_eq!(c.num_keys().unwrap(), 0);
    }
    assert_eq!(srv.num_connections(), CLIENTS);
    std::thread::scope(|s| {
        let getters: Vec<_> =
            clients[..BLOCKED].iter().map(|c| s.spawn(move || c.get_timeout("gate", T).unwrap())).collect();
        // The other clients work while the getters block.
        let start = Instant::now();
        let workers: Vec<_> = clients[BLOCKED..]
            .chunks(16)
            .enumerate()
            .map(|(j, chunk)| {
                s.spawn(move || {
                    for (i, c) in chunk.iter().enumerate() {
                        c.set(&format!("w{j}-{i}"), b"1").unwrap();
                        c.add("count", 1).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "workers were held up: {:?}", start.elapsed());
        let last = &clients[CLIENTS - 1];
        assert_eq!(last.get("count").unwrap(), (CLIENTS - BLOCKED).to_string().into_bytes());
        last.set("gate", b"open").unwrap();
        for g in getters {
            assert_eq!(g.join().unwrap(), b"open");
        }
    });
}

#[test]
fn connect_retries_until_the_server_starts() {
    // Find a free port, release it, and start the server there a bit later.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        TcpStoreServer::builder().token(None).bind(&format!("127.0.0.1:{port}")).unwrap()
    });
    let c = TcpStore::builder("127.0.0.1", port).token(None).timeout(T).connect().unwrap();
    let srv = h.join().unwrap();
    c.set("up", b"1").unwrap();
    assert_eq!(srv.port(), port);
}

#[test]
fn connect_gives_up_at_the_deadline() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let err =
        TcpStore::builder("127.0.0.1", port).token(None).timeout(Duration::from_millis(300)).connect().unwrap_err();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
    let msg = err.to_string();
    assert!(matches!(err, Error::Timeout { .. }) && msg.contains(&port.to_string()), "{msg}");
}

#[test]
fn master_hosts_the_server() {
    let master = TcpStore::new("127.0.0.1", 0, true, T).unwrap();
    assert!(master.is_master());
    let port = master.port();
    assert_ne!(port, 0);
    master.set("from-master", b"m").unwrap();
    let other = TcpStore::new("127.0.0.1", port, false, T).unwrap();
    assert!(!other.is_master());
    assert_eq!(other.get("from-master").unwrap(), b"m");
    other.set("from-other", b"o").unwrap();
    assert_eq!(master.get("from-other").unwrap(), b"o");
    // Dropping the master handle stops the server: the other side sees an error.
    drop(master);
    let start = Instant::now();
    assert!(other.get_timeout("from-master", T).is_err());
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn dead_server_gives_an_error_not_a_hang() {
    let mut srv = server();
    let c = client(&srv);
    let blocked = client(&srv);
    c.set("k", b"v").unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let start = Instant::now();
            (blocked.get_timeout("never", Duration::from_secs(30)), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        srv.shutdown();
        let (r, took) = h.join().unwrap();
        let err = r.unwrap_err();
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(matches!(err, Error::PeerLost { .. } | Error::Io { .. }), "{err}");
        assert!(err.to_string().contains(&blocked.describe()), "{err}");
    });
    let err = c.set("k", b"v2").unwrap_err();
    assert!(matches!(err, Error::PeerLost { .. } | Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("store.set"), "{err}");
    assert_eq!(srv.num_connections(), 0);
}

#[test]
fn hung_server_hits_the_client_deadline() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let c = TcpStore::builder("127.0.0.1", port).token(None).timeout(Duration::from_millis(300)).connect().unwrap();
    let start = Instant::now();
    let err = c.get_timeout("k", Duration::from_millis(100)).unwrap_err();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(4), "{took:?}");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    // Later calls use a fresh connection and hit their deadline too.
    let start = Instant::now();
    assert!(matches!(c.num_keys(), Err(Error::Timeout { .. })));
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(listener);
    // With the listener gone the error says the server is unreachable.
    let err = c.num_keys().unwrap_err();
    assert!(matches!(err, Error::PeerLost { .. }) && err.to_string().contains(&port.to_string()), "{err}");
}

fn env_of(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    move |k| map.get(k).cloned()
}

/// Runs `world` ranks as threads: rank 0 first (port 0 picks the port), then
/// the others; every rank publishes its rank and reads everyone's.
fn run_ranks(world: usize, init: impl Fn(usize, u16) -> rankweave::Result<rankweave::Rendezvous> + Sync) {
    let r0 = init(0, 0).unwrap();
    assert_ne!(r0.master_port, 0);
    let port = r0.master_port;
    let mut all = vec![r0];
    std::thread::scope(|s| {
        let init = &init;
        let hs: Vec<_> = (1..world).map(|rank| s.spawn(move || init(rank, port).unwrap())).collect();
        all.extend(hs.into_iter().map(|h| h.join().unwrap()));
    });
    std::thread::scope(|s| {
        for r in &all {
            s.spawn(move || {
                assert_eq!(r.world_size, world);
                assert_eq!(r.master_port, port);
                r.store.set(&format!("rank{}", r.rank), r.rank.to_string().as_bytes()).unwrap();
                let keys: Vec<String> = (0..world).map(|i| format!("rank{i}")).collect();
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                r.store.wait(&refs, T).unwrap();
                for (i, k) in keys.iter().enumerate() {
                    assert_eq!(r.store.get(k).unwrap(), i.to_string().into_bytes());
                }
                r.store.add("done", 1).unwrap();
            });
        }
    });
    assert_eq!(all[0].store.get("done").unwrap(), world.to_string().into_bytes());
    let mut ranks: Vec<usize> = all.iter().map(|r| r.rank).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, (0..world).collect::<Vec<_>>());
}

#[test]
fn tcp_init_with_ranks_as_threads() {
    run_ranks(4, |rank, port| {
        let env = env_of(&[]);
        let r = rendezvous_with_env(&format!("tcp://127.0.0.1:{port}"), Some(rank), Some(4), T, &env)?;
        assert_eq!(r.master_addr, "127.0.0.1");
        assert_eq!(r.local_rank, None);
        Ok(r)
    });
}

#[test]
fn env_init_with_ranks_as_threads() {
    run_ranks(3, |rank, port| {
        let env = env_of(&[
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", "3".into()),
            ("LOCAL_RANK", rank.to_string()),
        ]);
        let r = rendezvous_with_env("env://", None, None, T, &env)?;
        assert_eq!(r.local_rank, Some(rank));
        Ok(r)
    });
}

#[test]
fn init_errors_name_the_variable() {
    let t = Duration::from_millis(200);
    let full = [
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", "1".to_string()),
        ("RANK", "1".to_string()),
        ("WORLD_SIZE", "2".to_string()),
    ];
    let without = |name: &str| -> Vec<(&str, String)> { full.iter().filter(|(k, _)| *k != name).cloned().collect() };
    let expect = |r: rankweave::Result<rankweave::Rendezvous>, word: &str| match r {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(word), "`{m}` should name {word}"),
        other => panic!("expected InvalidArgument naming {word}, got {other:?}"),
    };
    for var in ["MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"] {
        expect(rendezvous_with_env("env://", None, None, t, &env_of(&without(var))), var);
    }
    let mut bad = without("RANK");
    bad.push(("RANK", "one".into()));
    expect(rendezvous_with_env("env://", None, None, t, &env_of(&bad)), "RANK");
    let mut bad = without("MASTER_PORT");
    bad.push(("MASTER_PORT", "70000".into()));
    expect(rendezvous_with_env("env://", None, None, t, &env_of(&bad)), "MASTER_PORT");
    let mut bad = full.to_vec();
    bad.push(("LOCAL_RANK", "-1".into()));
    expect(rendezvous_with_env("env://", None, None, t, &env_of(&bad)), "LOCAL_RANK");
    expect(rendezvous_with_env("env://", Some(2), None, t, &env_of(&full)), "rank");
    expect(rendezvous_with_env("env://", None, Some(0), t, &env_of(&full)), "world size");
    let mut zero = without("MASTER_PORT");
    zero.push(("MASTER_PORT", "0".into()));
    expect(rendezvous_with_env("env://", None, None, t, &env_of(&zero)), "MASTER_PORT");

    let none = env_of(&[]);
    expect(rendezvous_with_env("tcp://127.0.0.1:1", None, Some(2), t, &none), "rank");
    expect(rendezvous_with_env("tcp://127.0.0.1:1", Some(0), None, t, &none), "world size");
    expect(rendezvous_with_env("tcp://127.0.0.1", Some(0), Some(1), t, &none), "port");
    expect(rendezvous_with_env("file:///tmp/x", Some(0), Some(1), t, &none), "init_method");

    // Nothing listening: rank 1 times out rather than hanging.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let r = rendezvous_with_env(&format!("tcp://127.0.0.1:{port}"), Some(1), Some(2), t, &none);
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// The real environment, in a child process: the parent is rank 0, the child
/// (this test binary, re-run with only `env_child`) is rank 1 and reads
/// MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and
/// RANKWEAVE_TOKEN from its env.
#[test]
fn env_init_across_processes() {
    let env = env_of(&[
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", "0".into()),
        ("RANK", "0".into()),
        ("WORLD_SIZE", "2".into()),
        ("RANKWEAVE_TOKEN", "child-token".into()),
    ]);
    let r0 = rendezvous_with_env("env://", None, None, T, &env).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("RANKWEAVE_ENV_CHILD", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", r0.master_port.to_string())
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "1")
        .env("RANKWEAVE_TOKEN", "child-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(r0.store.get_timeout("child", T).unwrap(), b"rank 1 of 2, local 1");
    // The server really required the token.
    let port = r0.master_port;
    let stray = TcpStore::builder("127.0.0.1", port).token(None).timeout(T).connect().unwrap();
    assert!(matches!(stray.get("child"), Err(Error::Unauthorized(_))));
}

#[test]
#[ignore = "run by env_init_across_processes as its child process"]
fn env_child() {
    if std::env::var_os("RANKWEAVE_ENV_CHILD").is_none() {
        return;
    }
    let r = rendezvous("env://", None, None, T).unwrap();
    let msg = format!("rank {} of {}, local {}", r.rank, r.world_size, r.local_rank.unwrap());
    r.store.set("child", msg.as_bytes()).unwrap();
}
