#!/bin/bash
# Open MPI and rankweave one size at a time, each measurement between two
# readings of the host's vCPU state (docs/bench/vcpu_state.c), so that a
# ratio compares two figures taken in the same state (docs/PERFORMANCE.md,
# run 21: on the project's VM a line written by the other vCPU costs
# about 0.8, 2-3 or 9-12 us per 16 KiB hand-over, in stretches of a second
# to tens of seconds, and the shared-memory and loopback figures from 4
# KiB up move with it). Per round, size and world size: state, Open MPI,
# state, rankweave, state (the order of the two swaps every round).
# Tables: python3 docs/bench/paired.py $OUT.
# Usage, from the repository root after cargo build --release -p rankweave-cli:
#   cp -r ../shared/bench-anchors /tmp/anchors   # then its setup.sh
#   ANCHORS=/tmp/anchors OUT=/tmp/paired ROUNDS=4 bash docs/bench/paired.sh
# TRANSPORTS (default "shm tcp"), NS (default "2 4") and SIZES (default the
# anchors' sizes) narrow it.
set -u
OUT=${OUT:-/tmp/paired}; mkdir -p $OUT/p
RW=${RW:-$PWD/target/release/rankweave}
BENCH_DIR=$PWD/docs/bench
ROUNDS=${ROUNDS:-4}; TRANSPORTS=${TRANSPORTS:-shm tcp}; NS=${NS:-2 4}
SIZES=${SIZES:-8 16 64 256 1K 4K 16K 64K 256K 1M 4M 16M 64M 256M}
A=${ANCHORS:-/tmp/anchors}; cd $A
M=(mpirun --allow-run-as-root --oversubscribe --mca oob_tcp_if_include lo --mca pml ob1)
gcc -O2 -Wall -pthread -o $OUT/vcpu_state $BENCH_DIR/vcpu_state.c || exit 1
[ -x memcpy_bw ] || gcc -O2 -Wall -pthread -o memcpy_bw memcpy_bw.c
./memcpy_bw 2 $OUT/memcpy.csv > $OUT/memcpy.txt 2>&1
state() { $OUT/vcpu_state "$1" $OUT/state.csv > /dev/null; }
for r in $(seq 1 $ROUNDS); do
  for tr in $TRANSPORTS; do
    if [ $tr = shm ]; then BTL=(--mca btl vader,self); OPS=sendrecv; else BTL=(--mca btl tcp,self --mca btl_tcp_if_include lo); OPS=sendrecv,broadcast,all_reduce; fi
    for n in $NS; do
      for s in $SIZES; do
        # 256 MiB only at N = 2 over shared memory, as p2p-goals.sh.
        [ $s = 256M ] && { [ $n != 2 ] || [ $tr != shm ]; } && continue
        tag=$tr-n$n-$s-r$r
        ompi() { timeout 300 "${M[@]}" "${BTL[@]}" -np $n ./mpi_bench --impl openmpi-$tr --ops $OPS --time-per-point 0.2 --min-bytes $s --max-bytes $s --csv $OUT/p/ompi-$tag.csv > /dev/null 2>&1; }
        rw() { timeout 300 $RW bench $OPS --nproc $n --transport $tr --sizes $s --mode loop --iters-time 0.2 --csv $OUT/p/rw-$tag.csv > /dev/null 2>&1; }
        state $tag-a
        if [ $((r % 2)) = 1 ]; then ompi; state $tag-b; rw; else rw; state $tag-b; ompi; fi
        state $tag-c
      done
      echo "$(date +%T) round $r $tr n$n done" | tee -a $OUT/log
    done
  done
done
