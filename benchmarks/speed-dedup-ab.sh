#!/bin/bash
# usage: ab2.sh OUT ROUNDS "bin|args" ... ; alternates variants
out=$1; rounds=$2; shift 2
: > $out
for r in $(seq 1 $rounds); do
  for v in "$@"; do
    bin=/tmp/pw-${v%%|*}; args=${v#*|}
    sync; echo 1 > /proc/sys/vm/drop_caches
    line=$(timeout 600 $bin run $args --local --workload fill-from:/tmp/idle2g.img --mem-mib 2048 $COMMON 2>&1 | grep "^| [a-z]" | grep -v "^| codec")
    echo "$v | $line" >> $out
  done
done
