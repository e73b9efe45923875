//! Node identity: which ranks share a machine (and so can share memory).

/// This node's identity: the host name and, where readable, the kernel's
/// boot id (two containers with one host name but separate kernels, or a
/// host name reused across reboots, then differ). Every "same node"
/// decision of the crate (shared-memory groups, the message queue's local
/// readers, [`crate::coordinator::in_the_same_node_as`]) uses it.
pub fn node_identity() -> String {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{host}/{}", boot.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_identity_is_stable_and_names_the_host() {
        let id = node_identity();
        assert_eq!(id, node_identity());
        let host = nix::unistd::gethostname().unwrap();
        assert!(id.starts_with(&*host.to_string_lossy()), "{id}");
    }
}
