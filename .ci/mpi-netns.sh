#!/usr/bin/env bash
# `rankweave demo --backend mpi` with mpirun starting ranks in two network
# namespaces (two "nodes": own interfaces, own host names, joined by a veth
# pair): 2 ranks in each, TP groups inside a namespace, PP across them.
# Usage: .ci/mpi-netns.sh RANKWEAVE_BINARY. Exits 0 on PASS, 2 when this
# machine cannot create network namespaces (the caller skips), 1 otherwise.
set -euo pipefail
bin=$(realpath "$1")
id=$$
a="rwmpi$id-a" b="rwmpi$id-b" va="rwv${id}a" vb="rwv${id}b"
tmp=$(mktemp -d)
cleanup() {
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
if ! { ip netns add "$a" && ip netns add "$b"; } 2>/dev/null; then
    echo "mpi-netns: cannot create network namespaces here; skipped"
    exit 2
fi
ip link add "$va" type veth peer name "$vb"
ip link set "$va" netns "$a"
ip link set "$vb" netns "$b"
ip -n "$a" addr add 10.77.0.1/24 dev "$va"
ip -n "$b" addr add 10.77.0.2/24 dev "$vb"
for ns in "$a" "$b"; do
    ip -n "$ns" link set lo up
done
ip -n "$a" link set "$va" up
ip -n "$b" link set "$vb" up
# mpirun's remote-shell agent: "agent [ssh options] HOST COMMAND..." runs
# COMMAND in that host's namespace, under its own host name.
cat >"$tmp/agent" <<EOF
#!/bin/sh
while [ \$# -gt 0 ]; do case "\$1" in -*) shift;; *) break;; esac; done
host=\$1; shift
case "\$host" in 10.77.0.1) ns=$a;; 10.77.0.2) ns=$b;; *) echo "unknown host \$host" >&2; exit 1;; esac
exec ip netns exec \$ns unshare --uts sh -c "hostname \$ns; \$*"
EOF
chmod +x "$tmp/agent"
net=10.77.0.0/24
ip netns exec "$a" unshare --uts sh -c "hostname $a; exec env MASTER_ADDR=10.77.0.1 RANKWEAVE_TIMEOUT=120 \
    timeout 300 mpirun --allow-run-as-root --oversubscribe --mca plm_rsh_agent $tmp/agent \
    --host 10.77.0.1:2,10.77.0.2:2 --mca oob_tcp_if_include $net --mca btl_tcp_if_include $net \
    --mca btl tcp,vader,self -x MASTER_ADDR -x RANKWEAVE_TIMEOUT -n 4 $bin demo --backend mpi" >"$tmp/log" 2>&1 \
    || { cat "$tmp/log"; echo "mpi-netns: the demo failed across two namespaces"; exit 1; }
grep -q '^PASS' "$tmp/log" || { cat "$tmp/log"; echo "mpi-netns: no PASS"; exit 1; }
grep '^PASS' "$tmp/log"
