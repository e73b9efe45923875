# Tables of docs/bench/obj-goal.sh: python3 docs/bench/obj-goal.py OUTDIR.
# Per-round medians (us) of the loop mode; ratio = vLLM's queue / rankweave (> 1: rankweave faster).
import csv, glob, collections, statistics as st, sys, os, re
D = sys.argv[1] if len(sys.argv) > 1 else '/tmp/obj-goal'
d = collections.defaultdict(dict)
for f in glob.glob(D + '/*-r*.csv'):
    b = os.path.basename(f)
    who = b.split('-')[0]
    r = int(re.search(r'-r(\d+)\.csv', b).group(1))
    for row in csv.DictReader(open(f)):
        if row['mode'] != 'loop':
            continue
        impl = {'vllm-shm-mq': 'vLLM queue', 'rankweave-shm': f'{who} bcast_obj', 'rankweave-mq': f'{who} mq'}.get(row['impl'], row['impl'])
        d[(int(row['world_size']), int(row['bytes']))].setdefault(impl, {})[r] = float(row['median_us'])
for (n, b), impls in sorted(d.items()):
    print(f"\n### N={n}, {b} B\n")
    rounds = sorted({r for v in impls.values() for r in v})
    print("| impl | " + " | ".join(f"r{r}" for r in rounds) + " | median | vLLM / it (per round) |")
    print("|" + "---|" * (len(rounds) + 3))
    v = impls.get('vLLM queue', {})
    for impl in sorted(impls):
        row = impls[impl]
        ratios = [f"{v[r] / row[r]:.2f}" for r in rounds if r in v and r in row]
        print(f"| {impl} | " + " | ".join(f"{row[r]:.4g}" if r in row else "-" for r in rounds)
              + f" | {st.median(row.values()):.4g} | {' / '.join(ratios)} |")
