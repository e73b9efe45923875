# Tables of docs/bench/p2p-goals.sh: python3 docs/bench/p2p-goals.py OUTDIR (Open MPI / rankweave > 1: rankweave faster).
import csv,glob,collections,statistics as st,sys,os
D=sys.argv[1] if len(sys.argv)>1 else '/tmp/p2p-goals'
d=collections.defaultdict(list)
for f in glob.glob(D+'/*-r*.csv'):
    b=os.path.basename(f)
    who,tr=b.split('-')[0],b.split('-')[1]
    for r in csv.DictReader(open(f)):
        if r['mode']!='loop': continue
        # rwhuge: rankweave with --huge-pages, its own rows beside Open MPI's sendrecv
        op=r['op']+'_huge' if who=='rwhuge' else r['op']
        d[(tr,op,int(r['world_size']),int(r['bytes']),'rw' if who=='rwhuge' else who)].append(float(r['median_us']))
mem={}
if os.path.exists(D+'/memcpy.csv'):
    for r in csv.DictReader(open(D+'/memcpy.csv')):
        if r['op']=='copy' and r['threads']=='1': mem[int(r['bytes'])]=float(r['median_s'])*1e6
# The cross-core copy of docs/bench/xcore_copy.c (sizes 64 KiB x 4^k), the
# median over its runs (before and after the rounds), and its 1 MiB windows.
xcs=collections.defaultdict(list); win=[]
for f in sorted(glob.glob(D+'/xcore*.csv')):
    for r in csv.DictReader(open(f)):
        if r['op']=='cross': xcs[int(r['bytes'])].append(float(r['median_us']))
        if r['op']=='cross_window': win.append(float(r['median_us']))
xc={b:st.median(v) for b,v in xcs.items()}
def fmt(b):
    for u,s in ((1<<20,'MiB'),(1<<10,'KiB')):
        if b>=u: return f"{b//u} {s}"
    return f"{b} B"
keys=sorted({k[:4] for k in d})
for tr in ('shm','tcp'):
    print(f"\n### {tr}\n")
    hdr="| op | N | size | Open MPI us | rankweave us | Open MPI / rankweave |"
    if tr=='shm': hdr+=" memcpy us (1 thread) | memcpy / rankweave | cross-core copy us | cross-core / rankweave |"
    print(hdr); print("|"+"---|"*(hdr.count('|')-1))
    for k in keys:
        if k[0]!=tr: continue
        o=d.get(k+('ompi',)); w=d.get(k+('rw',))
        if not w: continue
        # ops absent in OMPI (e.g. sendrecv_shm) compare with OMPI's sendrecv
        if not o and k[1].startswith('sendrecv'): o=d.get((tr,'sendrecv',k[2],k[3],'ompi'))
        om=st.median(o) if o else float('nan'); wm=st.median(w)
        line=f"| {k[1]} | {k[2]} | {fmt(k[3])} | {' / '.join('%.4g'%x for x in o) if o else '-'} | {' / '.join('%.4g'%x for x in w)} | {om/wm:.2f} |"
        if tr=='shm':
            m=mem.get(k[3])
            line+=f" {m:.4g} | {m/wm:.2f} |" if m else " - | - |"
            x=xc.get(k[3])
            line+=f" {x:.4g} | {x/wm:.2f} |" if x else " - | - |"
        print(line)
    if tr=='shm' and win:
        print(f"\nCross-core copy of 1 MiB in {len(win)} windows of the probe's runs: {min(win):.4g}-{max(win):.4g} us"
              f" (hot memcpy {mem.get(1<<20,float('nan')):.4g} us).")
# The vCPU state (docs/bench/vcpu_state.c) before and after each
# measurement: a run of all sizes can span states, and Open MPI's and
# ours may sit in different ones (docs/PERFORMANCE.md, run 21).
if os.path.exists(D+'/state.csv'):
    def cls(us): return 'close' if us<=1.5 else 'near' if us<=5 else 'far'
    st_=collections.OrderedDict()
    for row in csv.reader(open(D+'/state.csv')):
        if len(row)==3: st_[row[0]]=float(row[2])
    print("\n### vCPU state around each measurement (16 KiB hand-over, us, before / after)\n")
    print("| measurement | before | after |"); print("|---|---|---|")
    for tag,us in st_.items():
        if tag.endswith('-a'):
            b=st_.get(tag[:-2]+'-b')
            print(f"| {tag[:-2]} | {us:.2f} ({cls(us)}) | " + (f"{b:.2f} ({cls(b)})" if b is not None else "-") + " |")

