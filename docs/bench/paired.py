# Tables of docs/bench/paired.sh: python3 docs/bench/paired.py OUTDIR.
# Each (round, transport, N, size) has an Open MPI and a rankweave figure
# (loop medians) and three readings of the vCPU state around them. A pair
# counts for a state when all three readings fall in it: close (16 KiB
# hand-over at most 1.5 us), near (at most 5 us) or far (above). The
# tables give, per state, the ratio Open MPI / rankweave (> 1: rankweave
# faster) as the median over that state's pairs and their range, the same
# ratio of the loop means (total time over iterations: an implementation
# whose calls mostly return early and sometimes late has a low median and
# a high mean), and for shared memory the one-thread memcpy / rankweave
# (medians) from 1 MiB.
import csv,glob,collections,statistics as st,sys,os,re
D=sys.argv[1] if len(sys.argv)>1 else '/tmp/paired'
def cls(us): return 'close' if us<=1.5 else 'near' if us<=5 else 'far'
state={}
if os.path.exists(D+'/state.csv'):
    for row in csv.reader(open(D+'/state.csv')):
        if len(row)==3: state[row[0]]=float(row[2])
fig=collections.defaultdict(dict)   # (tr,op,n,bytes,round) -> {who: us}
tags={}
for f in glob.glob(D+'/p/*.csv'):
    m=re.match(r'(ompi|rw)-((shm|tcp)-n(\d+)-(\w+)-r(\d+))\.csv$',os.path.basename(f))
    if not m: continue
    who,tag,tr,n,_,r=m.groups()
    for row in csv.DictReader(open(f)):
        if row['mode']!='loop': continue
        k=(tr,row['op'],int(n),int(row['bytes']),int(r))
        fig[k][who]=(float(row['median_us']),float(row['mean_us'])); tags[k]=tag
mem={}
if os.path.exists(D+'/memcpy.csv'):
    for row in csv.DictReader(open(D+'/memcpy.csv')):
        if row['op']=='copy' and row['threads']=='1': mem[int(row['bytes'])]=float(row['median_s'])*1e6
def fmt(b):
    for u,s in ((1<<20,'MiB'),(1<<10,'KiB')):
        if b>=u: return f"{b//u} {s}"
    return f"{b} B"
pairs=collections.defaultdict(list)  # (state,tr,op,n,bytes) -> [((ompi median, mean), (rw median, mean))]
counts=collections.Counter()
for k,v in fig.items():
    if 'ompi' not in v or 'rw' not in v: continue
    rd=[state.get(tags[k]+s) for s in ('-a','-b','-c')]
    if None in rd: continue
    c={cls(x) for x in rd}
    s=c.pop() if len(c)==1 else 'mixed'
    counts[s]+=1
    pairs[(s,)+k[:4]].append((v['ompi'],v['rw']))
print("pairs by state: "+", ".join(f"{s} {counts[s]}" for s in ('close','near','far','mixed')))
if state: print(f"state readings: {len(state)}, 16 KiB hand-over {min(state.values()):.2f}-{max(state.values()):.2f} us")
for s in ('close','near','far','mixed'):
    ks=sorted(k for k in pairs if k[0]==s)
    if not ks: continue
    print(f"\n### state {s}\n")
    print("| transport | op | N | size | pairs | Open MPI us | rankweave us | Open MPI / rankweave (median, range) | by the means | memcpy / rankweave |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        p=pairs[k]; rat=[o[0]/w[0] for o,w in p]; mrat=[o[1]/w[1] for o,w in p]
        om=st.median(o[0] for o,_ in p); wm=st.median(w[0] for _,w in p)
        m=mem.get(k[4]) if k[1]=='shm' and k[4]>=1<<20 else None
        mc=f"{m/wm:.2f}" if m else "-"
        print(f"| {k[1]} | {k[2]} | {k[3]} | {fmt(k[4])} | {len(p)} | {om:.4g} | {wm:.4g} | {st.median(rat):.2f} ({min(rat):.2f}-{max(rat):.2f}) | {st.median(mrat):.2f} | {mc} |")
