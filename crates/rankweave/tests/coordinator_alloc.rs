//! A peer that declares a buffer too big for this process's memory gets an
//! error naming the peer and the size, never an abort: this test binary
//! re-runs itself as a child under `RLIMIT_AS` of about 8 GB (as
//! `ulimit -v 8000000`), where two ranks (threads) exchange metadata that
//! declares a 16 GiB tensor and a 16 GiB object.

mod coord_common;

use coord_common::{opts, run_ranks};
use rankweave::coordinator::{CoordinatorOptions, GroupCoordinator, UniqueNames};
use rankweave::tensor::codec::{encode_metadata, MetadataEntry, TensorMetadata};
use rankweave::tensor::{DecodeLimits, Device};
use rankweave::{DType, Error, ProcessGroup};
use std::process::Command;
use std::sync::{Arc, Barrier};

const CHILD_ENV: &str = "RANKWEAVE_ALLOC_TEST_CHILD";
/// `ulimit -v 8000000` (KiB).
const LIMIT_BYTES: u64 = 8_000_000 * 1024;
/// What the peer declares: 16 GiB, twice the address-space limit.
const DECLARED: u64 = 16 << 30;

/// Sends a blob as the coordinator's wire format does: 8-byte length, bytes.
fn send_raw(pg: &ProcessGroup, declared_len: u64, body: &[u8], dst: usize) {
    pg.send_bytes(&declared_len.to_le_bytes(), dst).expect("send length");
    if !body.is_empty() {
        pg.send_bytes(body, dst).expect("send body");
    }
}

/// Runs in the child, under the lowered limit.
fn child() {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_AS, LIMIT_BYTES, LIMIT_BYTES).expect("setrlimit(RLIMIT_AS)");
    // The limit bites: a plain 16 GiB allocation fails here.
    assert!(Vec::<u8>::new().try_reserve_exact(DECLARED as usize).is_err(), "RLIMIT_AS is not in effect");

    let done = Arc::new(Barrier::new(2));
    let out = run_ranks(2, move |rank, store| {
        let pg = ProcessGroup::new_world(store, rank, 2, opts()).expect("world");
        // Limits above the declared sizes: only the allocation can refuse.
        let limits =
            DecodeLimits { max_tensor_bytes: 64 << 30, max_total_tensor_bytes: 64 << 30, max_object_bytes: 64 << 30 };
        let c = GroupCoordinator::new(
            &pg,
            &[vec![0, 1]],
            rank,
            CoordinatorOptions {
                group_name: Some("big".into()),
                limits: Some(limits),
                names: Some(Arc::new(UniqueNames::new())),
                ..Default::default()
            },
        )
        .expect("coordinator");
        let result = if rank == 0 {
            let cpu = c.cpu_group().expect("cpu group");
            let meta = encode_metadata(&[(
                "huge".to_string(),
                MetadataEntry::Tensor(TensorMetadata {
                    device: Device::Cpu,
                    dtype: DType::F32,
                    shape: vec![(DECLARED / 4) as usize],
                }),
            )])
            .expect("encode metadata");
            send_raw(&cpu, meta.len() as u64, &meta, 1);
            None
        } else {
            let dict = c.recv_tensor_dict(Some(0), None).map(|_| ());
            let after = c.barrier().map(|_| ());
            Some((dict, after))
        };
        done.wait();
        // A fresh coordinator for the object case (the first one is poisoned).
        let c2 = GroupCoordinator::new(
            &pg,
            &[vec![0, 1]],
            rank,
            CoordinatorOptions {
                group_name: Some("obj".into()),
                limits: Some(limits),
                names: Some(Arc::new(UniqueNames::new())),
                ..Default::default()
            },
        )
        .expect("second coordinator");
        let object = if rank == 0 {
            send_raw(&c2.cpu_group().expect("cpu group"), DECLARED, &[], 1);
            None
        } else {
            Some(c2.recv_object::<Vec<u8>>(0).map(|_| ()))
        };
        done.wait();
        (result, object)
    });
    let (Some((dict, after)), Some(object)) = (&out[1].0, &out[1].1) else {
        panic!("rank 1 returned no result");
    };
    for (what, r, group) in [("tensor dict", dict, "big:0"), ("object", object, "obj:0")] {
        let e = r.as_ref().expect_err(what);
        let msg = e.to_string();
        assert!(matches!(e, Error::OutOfMemory { bytes, .. } if *bytes == DECLARED), "{what}: {msg}");
        assert!(msg.contains(&DECLARED.to_string()), "{what}: the size is named: {msg}");
        assert!(msg.contains(&format!("in group {group}")) && msg.contains("(peer rank 0)"), "{what}: {msg}");
        assert_eq!(e.peer(), Some(0), "{what}: {msg}");
        println!("ALLOC-ERR {what}: {msg}");
    }
    let after = after.as_ref().expect_err("poisoned after the failed receive");
    assert!(matches!(after, Error::Poisoned { .. }), "{after}");
    println!("ALLOC-CHILD-OK");
}

#[test]
fn a_peer_declaring_16_gib_under_rlimit_as_is_an_error_not_an_abort() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["a_peer_declaring_16_gib_under_rlimit_as_is_an_error_not_an_abort", "--exact", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed ({}), e.g. SIGABRT:\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("ALLOC-CHILD-OK"), "the child did not run the check:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("cannot allocate {DECLARED} bytes")), "{stdout}");
}
