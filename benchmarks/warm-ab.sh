#!/bin/bash
# usage: warm-ab.sh TAG ROUNDS "NAME|args"...  like speed-ab-json.sh (same binaries, image and COMMON), but
# before each round writes 16 GiB into tmpfs and deletes it, so that the host backs this machine's free
# memory again for a while (BENCHMARKS.md, "The machine: fresh memory is the host's first touch"), and
# alternates the variants' order from round to round. WARM_EACH=1 warms before every run instead: on a
# machine that returns freed memory to its host quickly (free page reporting), the second run of a round
# otherwise pays the host's first touch that the first run did not (BENCHMARKS.md, "A second machine").
here=$(dirname "$0")
tag=$1; rounds=$2; shift 2
warm() { dd if=/dev/zero of=/dev/shm/pagewire-warm bs=1M count=16384 status=none; rm -f /dev/shm/pagewire-warm; }
for r in $(seq 1 "$rounds"); do
  [ "${WARM_EACH:-0}" = 1 ] || warm
  vs=("$@")
  if [ $((r % 2)) -eq 0 ]; then vs=(); for ((k=$#; k>=1; k--)); do vs+=("${!k}"); done; fi
  for v in "${vs[@]}"; do
    [ "${WARM_EACH:-0}" = 1 ] && warm
    bash "$here/speed-ab-json.sh" "$tag-r$r" 1 "$v"
  done
done
