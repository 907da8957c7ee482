#!/bin/bash
# usage: speed-ab-json.sh TAG ROUNDS "NAME|args"...  runs /tmp/pw-NAME (a pagewire-stress build) on the image
# /tmp/idle2g.img (pagewire-stress image --workload idle --mem-mib 2048 --out /tmp/idle2g.img),
# alternating, and prints setup ms, total ms, pages/s, CPU s, the destination's resident MiB (0 where the
# build does not report it), compression and wire bytes per second per run
tag=$1; rounds=$2; shift 2
for r in $(seq 1 $rounds); do for v in "$@"; do
  bin=/tmp/pw-${v%%|*}; args=${v#*|}
  sync; echo 1 > /proc/sys/vm/drop_caches
  timeout 600 $bin run $args --local --workload fill-from:/tmp/idle2g.img --mem-mib 2048 --no-progress --json /tmp/abj.json $COMMON > /dev/null 2>&1
  python3 -c "
import json
d=json.load(open('/tmp/abj.json'))
for c in d['cells']:
  for r in c['runs']:
    s=r.get('stats') or {}
    a=s.get('adaptive') or []
    a=a if isinstance(a,list) else [a]
    tot={}
    for ch in a:
      for c in ch.get('choices',[]): tot[c['choice']]=tot.get(c['choice'],0)+c['guest_bytes']
    g=sum(tot.values()) or 1
    shares=' '.join('%s %.0f%%' % (k,100*v/g) for k,v in tot.items() if v)
    print('$tag | $v | setup %.1f | total %.0f | %.0f pages/s | cpu %.2f/%.2f | res %.0f MiB | ratio %.2f | wire %.1f MB/s | %s' % (r['setup_ms'], r['total_ms'], r['pages_per_s'], r['cpu_source_s'], r['cpu_destination_s'], r.get('dst_resident_bytes', 0)/2**20, r['guest_bytes']/max(1,r['wire_bytes']), r['wire_bytes']/max(1e-9,r['total_ms']/1e3)/1e6, shares))
"
done; done
