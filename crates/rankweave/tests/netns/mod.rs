//! "Nodes" for tests: one network namespace per node, each with its own
//! host name (a UTS namespace per command) and an `eth0` joined to the
//! others through a bridge in a hub namespace. Node `i` has `10.77.0.{i+1}`
//! and `fd77::{i+1}`; nothing else is reachable from inside, and every
//! namespace is deleted when the [`Cluster`] drops (also when a test fails;
//! a cluster left behind by a killed test run is removed by the next one).
//!
//! Needs root and `ip` (iproute2) and `unshare` (util-linux). Where they are
//! missing, [`Cluster::new`] says so in one line; under CI (`CI` set) that
//! fails the test, elsewhere the test returns early.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Namespaces of one test.
pub struct Cluster {
    prefix: String,
    hub: String,
    nodes: Vec<String>,
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out)
}

/// Deletes namespaces of earlier test processes that are gone.
fn sweep_stale() {
    let Ok(out) = ip(&["netns", "list"]) else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("rwt") else { continue };
        let pid: Option<i32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

impl Cluster {
    /// `n` nodes on one bridge, or why that is impossible here.
    pub fn try_new(n: usize) -> Result<Cluster, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("network-namespace tests need root".into());
        }
        for tool in ["ip", "unshare"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(format!("network-namespace tests need `{tool}` (iproute2, util-linux)"));
            }
        }
        sweep_stale();
        let prefix = format!("rwt{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut c = Cluster { hub: format!("{prefix}-hub"), nodes: Vec::new(), prefix };
        ip(&["netns", "add", &c.hub])?;
        ip(&["-n", &c.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &c.hub, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{}-n{i}", c.prefix);
            ip(&["netns", "add", &ns])?;
            c.nodes.push(ns.clone());
            let port = format!("p{i}");
            ip(&["link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &c.hub])?;
            ip(&["-n", &c.hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.77.0.{}/24", i + 1), "dev", "eth0"])?;
            ip(&["-n", &ns, "addr", "add", &format!("fd77::{}/64", i + 1), "dev", "eth0", "nodad"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(c)
    }

    /// [`Cluster::try_new`], or `None` after one line saying why the test
    /// cannot run (a panic under CI, where it must run).
    pub fn new(n: usize) -> Option<Cluster> {
        match Cluster::try_new(n) {
            Ok(c) => Some(c),
            Err(why) if std::env::var_os("CI").is_some() => panic!("cannot run under CI: {why}"),
            Err(why) => {
                eprintln!("skipped: {why}");
                None
            }
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s IPv4 address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Node `i`'s IPv6 address.
    pub fn addr6(&self, i: usize) -> String {
        format!("fd77::{}", i + 1)
    }

    /// Node `i`'s host name.
    pub fn host(&self, i: usize) -> String {
        format!("node{i}")
    }

    /// `program` run inside node `i` (its namespace, under its host name).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.nodes[i], "unshare", "--uts", "sh", "-c"])
            .arg(format!("hostname {} && exec \"$0\" \"$@\"", self.host(i)))
            .arg(program);
        c
    }

    /// Partitions node `i` from the others without a reset: the bridge
    /// stops forwarding its port, so its packets and those sent to it vanish
    /// while every link stays up (a failed switch, a partition, a node that
    /// lost power as seen from the others): the port leaves the bridge.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.hub, "link", "set", "dev", &format!("p{i}"), "nomaster"]).expect("detaching the bridge port");
    }

    /// Sets node `i`'s link down (its cable pulled): node `i` sees no
    /// carrier, the others see silence.
    pub fn unplug(&self, i: usize) {
        ip(&["-n", &self.hub, "link", "set", &format!("p{i}"), "down"]).expect("link down");
    }

    /// Bytes node `i` sent on its `eth0`.
    pub fn tx_bytes(&self, i: usize) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.nodes[i], "cat", "/sys/class/net/eth0/statistics/tx_bytes"])
            .output()
            .expect("reading tx_bytes");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
