//! Objects between ranks: broadcast_object, a send_object / recv_object ring
//! and the same-node probe, asserting results.

use rankweave::parallel_state as ps;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Plan {
    model: String,
    layers: Vec<(usize, usize)>,
    dtype: Option<String>,
}

fn plan() -> Plan {
    Plan { model: "tiny-llama".into(), layers: vec![(0, 11), (12, 23)], dtype: Some("bf16".into()) }
}

fn main() -> rankweave::Result<()> {
    if std::env::var_os("WORLD_SIZE").is_some() {
        ps::init_distributed_environment(-1, -1, "env://", -1, "gloo")?;
    } else {
        ps::init_distributed_environment(1, 0, "tcp://127.0.0.1:0", -1, "gloo")?;
    }
    let w = ps::get_world_group()?;
    let (r, n) = (w.rank_in_group(), w.world_size());

    let got = w.broadcast_object((r == 0).then(plan), 0)?;
    assert_eq!(got, plan());

    if n > 1 {
        // Ring: rank r sends its rank to r + 1; even ranks send first.
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let from_prev: usize = if r % 2 == 0 {
            w.send_object(&r, next)?;
            w.recv_object(prev)?
        } else {
            let v = w.recv_object(prev)?;
            w.send_object(&r, next)?;
            v
        };
        assert_eq!(from_prev, prev);
        assert!(w.send_object(&0u8, r).is_err(), "sending to oneself is an error");
    }

    let same = w.in_the_same_node_as(0)?;
    assert_eq!(same.len(), n);
    assert!(same[0]);
    if r == 0 {
        println!("objects: ok on {n} ranks; same node as rank 0: {same:?}");
    }
    ps::destroy_distributed_environment();
    Ok(())
}
