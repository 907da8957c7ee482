# What zstd at levels -5, 1 and 3 saves on whole 128-page frames of the two-copy image
# (/tmp/idle2g.img) and on their first 16 and 64 pages, zero and one-byte pages left
# out as the pipeline leaves them out: how a paired sample's size biases the comparison
# of two levels. Needs Python's `zstandard` (pip install zstandard). Prints the share
# saved and the ratio per case: f = whole frame, s = first 16 pages, s64 = first 64.
import zstandard as z, random, sys
f=open('/tmp/idle2g.img','rb'); size=2<<30; PS=4096
random.seed(1)
c1=z.ZstdCompressor(level=1); c3=z.ZstdCompressor(level=3); cm5=z.ZstdCompressor(level=-5)
tot={k:[0,0] for k in ['f1','f3','s1','s3','s64_1','s64_3','fm5','sm5']}
n=0
offs=sorted(random.sample(range(size//(128*PS)), 400))
for o in offs:
    f.seek(o*128*PS); b=f.read(128*PS)
    pages=[b[i:i+PS] for i in range(0,len(b),PS)]
    pages=[p for p in pages if p.count(p[0:1])!=PS]
    if len(pages)<32: continue
    n+=1
    full=b''.join(pages); s16=b''.join(pages[:16]); s64=b''.join(pages[:64])
    for k,c,d in [('f1',c1,full),('f3',c3,full),('s1',c1,s16),('s3',c3,s16),('s64_1',c1,s64),('s64_3',c3,s64),('fm5',cm5,full),('sm5',cm5,s16)]:
        tot[k][0]+=len(c.compress(d)); tot[k][1]+=len(d)
print(n)
for k,(a,b) in tot.items(): print(k, "saved %.4f ratio %.3f"%(1-a/b, b/a))
