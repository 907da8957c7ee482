#!/bin/bash
# usage: resident-one.sh BIN IMAGE PREFAULT CODEC TAG  runs one local 2 GiB migration of IMAGE (2 channels) and
# prints the destination's backed guest memory after it (dst_resident_bytes), pages/s, the destination's and
# the source's CPU seconds, whether it verified, and the transparent huge pages faulted in meanwhile
# (thp_fault_alloc of /proc/vmstat; the source's memory is not advised, so they are the destination's).
bin=$1; img=$2; pf=$3; codec=$4; tag=$5
t0=$(awk '/^thp_fault_alloc /{print $2}' /proc/vmstat)
$bin run --codec "$codec" --level 1 --channels 2 --local --workload "fill-from:$img" --mem-mib 2048 --no-progress \
    --prefault "$pf" --json "/tmp/r-$tag.json" > "/tmp/r-$tag.log" 2>&1
t1=$(awk '/^thp_fault_alloc /{print $2}' /proc/vmstat)
python3 -c "
import json
r = json.load(open('/tmp/r-$tag.json'))['cells'][0]['runs'][0]
print('%-28s res %7.1f MiB  %9.0f pages/s  dst %.2f  src %.2f  %s thp %d' % ('$tag', r['dst_resident_bytes'] / 2**20,
      r['pages_per_s'], r['cpu_destination_s'], r['cpu_source_s'], r['verified'], $t1 - $t0))"
