#!/usr/bin/env bash
# rankweave beside Open MPI over TCP across two "nodes": network namespaces
# joined by a bridge (as the multi-node tests build them), one rank per node,
# back to back in one run. Needs root, iproute2, util-linux, Open MPI
# (openmpi-bin libopenmpi-dev) and a release build of rankweave.
#
#   cargo build --release -p rankweave-cli
#   bash docs/bench/netns.sh OUTDIR [extra bench args]
#
# Writes OUTDIR/mpi_bench.csv and OUTDIR/rankweave.csv (the anchors' columns)
# and prints the merged table (../shared/bench-anchors/compare.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
anchors="${ANCHORS:-$root/../shared/bench-anchors}"
out="$(mkdir -p "${1:?usage: netns.sh OUTDIR}" && cd "$1" && pwd)"
shift
rw="$root/target/release/rankweave"
[ -x "$rw" ] || { echo "build first: cargo build --release -p rankweave-cli" >&2; exit 1; }
ops=all_reduce,sendrecv
maxb="${MAX_BYTES:-64M}"

work="$(mktemp -d)"
p="rwb$$"
cleanup() {
    for ns in "$p-n0" "$p-n1" "$p-hub"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$p-hub"
ip -n "$p-hub" link add br0 type bridge
ip -n "$p-hub" link set br0 up
for k in 0 1; do
    ip netns add "$p-n$k"
    ip link add eth0 netns "$p-n$k" type veth peer name "p$k" netns "$p-hub"
    ip -n "$p-hub" link set "p$k" master br0 up
    ip -n "$p-n$k" addr add "10.77.0.$((k + 1))/24" dev eth0
    ip -n "$p-n$k" link set eth0 up
    ip -n "$p-n$k" link set lo up
done

# Open MPI: mpirun in node 0; the remote rank's daemon is started in node 1's
# namespace by an rsh agent that enters it. `--bind-to none`: each "node"'s
# daemon would otherwise bind its rank to core 0, both ranks would share one
# core and every operation would cost whole 4 ms scheduler slices.
# `mpi_yield_when_idle 0`: with one slot per "host" Open MPI otherwise
# sleeps when idle, which also costs a 4 ms slice per wait here.
mpicc -O2 -o "$work/mpi_bench" "$anchors/mpi_bench.c"
cat >"$work/agent.sh" <<AGENT
#!/bin/sh
host="\$1"; shift
case "\$host" in 10.77.0.1) ns=$p-n0;; 10.77.0.2) ns=$p-n1;; *) echo "agent: unknown host \$host" >&2; exit 1;; esac
exec ip netns exec "\$ns" sh -c "\$*"
AGENT
chmod +x "$work/agent.sh"
echo "== Open MPI (tcp btl) across the namespaces"
timeout 600 ip netns exec "$p-n0" mpirun --allow-run-as-root -np 2 --host 10.77.0.1:1,10.77.0.2:1 \
    --bind-to none --mca plm_rsh_agent "$work/agent.sh" --mca oob_tcp_if_include eth0 \
    --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include eth0 --mca mpi_yield_when_idle 0 ${MPI_EXTRA:-} \
    "$work/mpi_bench" --impl openmpi-tcp-2nodes --ops "$ops" --time-per-point 0.2 --max-bytes "$maxb" \
    --csv "$out/mpi_bench.csv" >"$out/mpi_bench.txt" 2>&1 || { cat "$out/mpi_bench.txt"; exit 1; }

echo "== rankweave across the namespaces"
pids=()
for k in 0 1; do
    ip netns exec "$p-n$k" unshare --uts sh -c "hostname node$k && exec \"\$0\" \"\$@\"" \
        "$rw" launch --nnodes 2 --node-rank "$k" --nproc-per-node 1 --master-addr 10.77.0.1 --master-port 29500 -- \
        "$rw" bench "$ops" --sizes anchors --max-bytes "$maxb" --mode loop --iters-time 0.2 --transport tcp \
        --csv "$out/rankweave.csv" "$@" >"$out/rankweave-node$k.txt" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { cat "$out"/rankweave-node*.txt; exit 1; }; done
sed -i 's/^rankweave-tcp,/rankweave-tcp-2nodes,/' "$out/rankweave.csv"
python3 "$anchors/compare.py" "$out/mpi_bench.csv" "$out/rankweave.csv" | tee "$out/tables.md"
