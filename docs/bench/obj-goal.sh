#!/bin/bash
# Object broadcast goal in one run (docs/PERFORMANCE.md run 16): vLLM's
# shared-memory MessageQueue (the anchors' shm_bench.py, 1 and 3 readers)
# beside rankweave's object broadcast through a shared-memory group
# (bcast_obj) and its MessageQueue port (mq), N = 2 and 4, ROUNDS rounds,
# the order alternating per round; OLD=binary adds an older build. Tables:
# python3 docs/bench/obj-goal.py $OUT.
# Usage, from the repository root after cargo build --release -p rankweave-cli:
#   cp -r ../shared/bench-anchors /tmp/anchors && (cd /tmp/anchors && bash setup.sh && bash get_vllm_shm_broadcast.sh)
#   ANCHORS=/tmp/anchors OUT=/tmp/obj-goal ROUNDS=4 bash docs/bench/obj-goal.sh
set -u
OUT=${OUT:-/tmp/obj-goal}; mkdir -p $OUT
RW=${RW:-$PWD/target/release/rankweave}
ROUNDS=${ROUNDS:-4}
A=${ANCHORS:-/tmp/anchors}; cd $A
log() { echo "$(date +%T) $*" | tee -a $OUT/log; }
vllm() { log "r$1 vllm"; timeout 120 python3 shm_bench.py --readers 1,3 --loop-iters 3000 --sync-iters 10 --csv $OUT/vllm-r$1.csv > $OUT/vllm-r$1.txt 2>&1; }
rw() { # name binary round
  for n in 2 4; do
    log "r$3 $1 n$n"; timeout 120 $2 bench bcast_obj,mq --nproc $n --transport shm --mode loop --iters-time 0.2 --csv $OUT/$1-n$n-r$3.csv > $OUT/$1-n$n-r$3.txt 2>&1
  done
}
for r in $(seq 1 $ROUNDS); do
  if [ $((r % 2)) = 1 ]; then
    vllm $r; rw new $RW $r; [ -n "${OLD:-}" ] && rw old $OLD $r
  else
    [ -n "${OLD:-}" ] && rw old $OLD $r; rw new $RW $r; vllm $r
  fi
done
log done
